"""The request schema of the Serve application: one flight (or a list) as callers send it.

The fields are ``mlops.schema.REQUEST_FIELDS`` with their limits; validation returns the plain
dicts the features take, with a status and a detail naming the bad field.
"""

# No ``from __future__ import annotations``: pydantic reads these annotations at runtime.

from typing import Annotated, Any, NotRequired

import orjson
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from starlette.responses import Response
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12


class FlightRequest(TypedDict):
    """What a caller knows about a flight before it departs.

    A TypedDict rather than a model: validation yields the plain dicts the features take, with no
    model object built and dumped per row.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    year: Annotated[int, Field(ge=1900, le=2100)]
    month: Annotated[int, Field(ge=1, le=12)]
    day: Annotated[int, Field(ge=1, le=31)]
    sched_dep_time: Annotated[int, Field(ge=0, le=2400, description="local HHMM")]
    sched_arr_time: Annotated[int, Field(ge=0, le=2400, description="local HHMM")]
    carrier: Annotated[str, Field(min_length=2, max_length=3)]
    flight: Annotated[int, Field(ge=0)]
    tailnum: NotRequired[str | None]
    origin: Annotated[str, Field(min_length=3, max_length=4)]
    dest: Annotated[str, Field(min_length=3, max_length=4)]
    distance: Annotated[float, Field(gt=0)]


_ONE_OR_MANY = TypeAdapter(list[FlightRequest] | FlightRequest)


def validate_request(
    payload: Any, known_carriers: frozenset[str] | None, max_rows: int
) -> tuple[int, Any]:
    """(status, rows or error detail): 413 oversized, 422 invalid naming the field, 200 rows.

    One TypeAdapter call validates the whole list; rows come back as plain dicts.
    """
    if isinstance(payload, list) and len(payload) > max_rows:
        return 413, f"batch of {len(payload)} rows exceeds the limit of {max_rows}"
    try:
        parsed = _ONE_OR_MANY.validate_python(payload)
    except ValidationError as exc:
        return 422, [
            {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()
        ]
    rows = parsed if isinstance(parsed, list) else [parsed]
    for r in rows:
        r.setdefault("tailnum", None)
    if known_carriers:
        bad = [
            {
                "loc": [i, "carrier"],
                "msg": f"unknown carrier code {r['carrier']!r}",
                "type": "value",
            }
            for i, r in enumerate(rows)
            if r["carrier"] not in known_carriers
        ]
        if bad:
            return 422, bad
    return 200, rows


def validate_body(
    body: bytes, known_carriers: frozenset[str] | None, max_rows: int
) -> tuple[int, Any]:
    """:func:`validate_request` on a raw request body; 400 when it is not JSON."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return 400, "body is not valid JSON"
    return validate_request(payload, known_carriers, max_rows)


def json_response(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json")
