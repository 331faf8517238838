"""The drift webhook: signed alerts from external monitors become ``mlops.drift.detected``.

External monitors (Prometheus Alertmanager through a signing relay, Evidently, a custom job) POST
a JSON alert to ``/hooks/drift``; an accepted alert is emitted with ``mlops.events.emit_drift``,
the same event the hourly drift flow emits, so one deployment trigger starts retraining.

Every request carries two headers::

    X-Mlops-Timestamp: <unix seconds>
    X-Mlops-Signature: sha256=<hex HMAC-SHA256(secret, b"<timestamp>." + body)>

Answers: 202 ``{"event_id", "duplicate": false}`` for an emitted alert; 200 with the original
event id and ``"duplicate": true`` for the same model and alert id inside the cooldown; 401 for a
missing, malformed or wrong signature, a timestamp outside the replay window or a signature seen
before; 413 for a body over the limit; 400 for a body that is not JSON; 422 naming the field for
an alert that fails the schema; 503 when the Prefect API does not take the event (nothing is
recorded then, so the sender's retry, even the identical request, goes through).

The pure core (signature check, replay cache, cooldown registry, payload parsing) does no I/O:
the clock and the emitter are passed in. ``create_app`` wraps it in a Starlette app, ``serve``
runs that on uvicorn. Nothing here reads the environment or imports Prefect at import time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from mlops.errors import UserError
from mlops.events import DriftAlert
from mlops.settings import Settings

log = logging.getLogger(__name__)

HOOK_PATH = "/hooks/drift"
HEALTH_PATH = "/healthz"
TIMESTAMP_HEADER = "X-Mlops-Timestamp"
SIGNATURE_HEADER = "X-Mlops-Signature"
MIN_SECRET_LENGTH = 16
# Event ids are uuid5(namespace, "model|alert id|cooldown bucket"). A restarted receiver (its
# cooldown state is in memory) or a second replica sends the same id inside one bucket, and the
# Prefect server stores an event id once and its triggers skip an id they have already seen.
EVENT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "mlops.drift.detected/webhook")

_SIGNATURE = re.compile(r"sha256=([0-9a-fA-F]{64})")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Rejected(Exception):
    """A refused request: its HTTP status and a one-line reason that never holds a secret."""

    def __init__(self, status: int, reason: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.errors = errors

    def body(self) -> dict[str, Any]:
        return {"detail": self.reason, **({"errors": self.errors} if self.errors else {})}


# ---------------------------------------------------------------------------------------------
# Signatures


def sign(secret: bytes, timestamp: int | str, body: bytes) -> str:
    """The ``X-Mlops-Signature`` value for ``body`` sent at ``timestamp`` (unix seconds)."""
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def read_auth_headers(
    timestamp: str | None, signature: str | None, now: float, window_s: float
) -> tuple[int, str]:
    """(timestamp, lower-case hex digest) from the headers; 401 when missing, malformed or stale.

    Checked before the body is read, so an unsigned request costs no more than its headers.
    """
    if not signature:
        raise Rejected(401, f"missing {SIGNATURE_HEADER} header")
    if not timestamp:
        raise Rejected(401, f"missing {TIMESTAMP_HEADER} header")
    match = _SIGNATURE.fullmatch(signature.strip())
    if not match:
        raise Rejected(401, f"malformed {SIGNATURE_HEADER}: expected sha256=<64 hex digits>")
    if not _TIMESTAMP.fullmatch(timestamp.strip()):
        raise Rejected(401, f"malformed {TIMESTAMP_HEADER}: expected unix seconds")
    ts = int(timestamp)
    if abs(now - ts) > window_s:
        raise Rejected(401, f"timestamp outside the replay window of {window_s:g}s")
    return ts, match.group(1).lower()


def verify_signature(secret: bytes, timestamp: int, digest: str, body: bytes) -> None:
    """Raise 401 unless ``digest`` is the HMAC of this timestamp and body (constant time)."""
    expected = sign(secret, timestamp, body).removeprefix("sha256=")
    if not hmac.compare_digest(expected, digest):
        raise Rejected(401, "signature mismatch")


class ReplayCache:
    """Signatures accepted inside the replay window: each signed request is taken once.

    Only verified signatures enter, and each leaves when its timestamp leaves the window (after
    which the timestamp check refuses it anyway), so the cache stays as small as the traffic.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._expires: dict[str, float] = {}

    def claim(self, digest: str, expires_at: float, now: float) -> bool:
        """Record ``digest``; False when it is already recorded (a replay)."""
        with self._lock:
            for key in [k for k, exp in self._expires.items() if exp < now]:
                del self._expires[key]
            if digest in self._expires:
                return False
            self._expires[digest] = expires_at
            return True

    def release(self, digest: str) -> None:
        """Forget ``digest``, so the sender may retry the identical request."""
        with self._lock:
            self._expires.pop(digest, None)

    def __len__(self) -> int:
        return len(self._expires)


@dataclass(frozen=True)
class Admission:
    event_id: str
    duplicate: bool


@dataclass
class _Seen:
    at: float
    event_id: str


class CooldownRegistry:
    """One emission per key inside the cooldown, even for a burst of concurrent requests.

    ``admit`` runs the emitter for the first request of a key and records its event id only once
    it succeeded; requests for the same key meanwhile wait for it, then get that event id as a
    duplicate. A failed emission records nothing: the next request for the key emits again.
    Different keys never wait for each other. State is in memory: one receiver process.
    """

    def __init__(self, cooldown_s: float, clock: Callable[[], float] = time.time) -> None:
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, _Seen] = {}
        self._pending: dict[str, threading.Event] = {}

    def admit(self, key: str, emit: Callable[[], str]) -> Admission:
        while True:
            with self._lock:
                now = self._clock()
                for k in [k for k, s in self._seen.items() if now - s.at >= self.cooldown_s]:
                    del self._seen[k]
                if key in self._seen:
                    return Admission(self._seen[key].event_id, duplicate=True)
                pending = self._pending.get(key)
                if pending is None:
                    self._pending[key] = threading.Event()
                    break
            pending.wait()
        try:
            event_id = emit()
            with self._lock:
                self._seen[key] = _Seen(self._clock(), event_id)
            return Admission(event_id, duplicate=False)
        finally:
            with self._lock:
                self._pending.pop(key).set()


def event_id_for(key: str, now: float, cooldown_s: float) -> uuid.UUID:
    """Deterministic event id: the same key (model and alert id) in one cooldown bucket share it.

    Two emissions for a key are at least a cooldown apart, so they never share a bucket.
    """
    return uuid.uuid5(EVENT_NAMESPACE, f"{key}|{int(now // cooldown_s)}")


# ---------------------------------------------------------------------------------------------
# The alert


def _printable(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


_Line = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(_printable)]
_Sender = Annotated[
    str, StringConstraints(min_length=1, max_length=100), AfterValidator(_printable)
]
_Score = Annotated[float, Strict(), AllowInfNan(False)]


class AlertPayload(BaseModel):
    """What a sender posts. Unknown fields are refused, so a misspelt one is never dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alert_id: _Line
    model: _Line | None = None
    window_start: dt.date
    window_end: dt.date
    scores: dict[_Line, _Score] = Field(default_factory=dict)
    reason: Annotated[str, StringConstraints(max_length=2000)] = ""
    sender: _Sender = "unknown"

    @field_validator("window_start", "window_end", mode="before")
    @classmethod
    def _iso_date(cls, value: Any) -> Any:
        if not (isinstance(value, str) and _ISO_DATE.fullmatch(value)):
            raise ValueError("must be an ISO date, YYYY-MM-DD")
        return value

    @field_validator("window_end")
    @classmethod
    def _ordered(cls, value: dt.date, info: ValidationInfo) -> dt.date:
        start = info.data.get("window_start")
        if start is not None and value < start:
            raise ValueError(f"is before window_start ({start.isoformat()})")
        return value


def _reject_no_nan(constant: str) -> float:
    raise ValueError(f"{constant} is not valid JSON")


def parse_alert(body: bytes, model_name: str) -> DriftAlert:
    """The drift alert in ``body``; 400 when it is not JSON, 422 naming the field otherwise.

    ``model`` may be left out; when given it must be ``model_name``, the model this receiver
    retrains: the training deployment's trigger matches every ``mlops.model.*`` resource, so an
    alert meant for another model must not start this one's retraining.
    """
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_no_nan)
    except UnicodeDecodeError:
        raise Rejected(400, "body is not UTF-8") from None
    except RecursionError:
        raise Rejected(400, "body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError is one
        raise Rejected(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Rejected(422, f"invalid alert: expected a JSON object, got {type(data).__name__}")
    if "alerts" in data and "groupKey" in data:
        raise Rejected(
            422,
            "invalid alert: Alertmanager's native payload is not accepted; "
            "send the documented schema through a signing relay",
        )
    try:
        payload = AlertPayload.model_validate(data)
    except ValidationError as exc:
        errors = [
            {"loc": [str(p) for p in e["loc"]], "msg": e["msg"].removeprefix("Value error, ")}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        first = errors[0]
        raise Rejected(
            422, f"invalid alert: {'.'.join(first['loc'])}: {first['msg']}", errors
        ) from None
    if payload.model not in (None, model_name):
        msg = f"this receiver takes alerts for model {model_name!r} only"
        raise Rejected(422, f"invalid alert: model: {msg}", [{"loc": ["model"], "msg": msg}])
    return DriftAlert(
        model_name=model_name,
        window_start=payload.window_start,
        window_end=payload.window_end,
        source=f"webhook:{payload.sender}",
        scores=dict(payload.scores),
        reason=payload.reason,
        alert_id=payload.alert_id,
    )


# ---------------------------------------------------------------------------------------------
# The receiver: the core's decisions in order, with the clock and the emitter passed in


@dataclass(frozen=True)
class WebhookConfig:
    secret: bytes = field(repr=False)
    model_name: str
    max_body_bytes: int = 64 * 1024
    replay_window_s: int = 300
    cooldown_s: int = 3600

    @classmethod
    def from_settings(cls, settings: Settings, secret: str) -> WebhookConfig:
        return cls(
            secret=secret.encode(),
            model_name=settings.model_name,
            max_body_bytes=settings.webhook_max_body_bytes,
            replay_window_s=settings.webhook_replay_window_s,
            cooldown_s=settings.webhook_cooldown_s,
        )


Emitter = Callable[[DriftAlert, uuid.UUID], str]


class DriftWebhook:
    """Checks a request, then emits its alert once per cooldown; raises ``Rejected`` otherwise."""

    def __init__(
        self, config: WebhookConfig, emit: Emitter, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self._emit = emit
        self._clock = clock
        self.replays = ReplayCache()
        self.cooldown = CooldownRegistry(config.cooldown_s, clock)

    def check_headers(self, headers: Mapping[str, str]) -> tuple[int, str]:
        return read_auth_headers(
            headers.get(TIMESTAMP_HEADER),
            headers.get(SIGNATURE_HEADER),
            self._clock(),
            self.config.replay_window_s,
        )

    def handle(self, timestamp: int, digest: str, body: bytes) -> tuple[DriftAlert, Admission]:
        """Verify, refuse replays, parse, then emit unless the alert is inside its cooldown."""
        verify_signature(self.config.secret, timestamp, digest, body)
        now = self._clock()
        if not self.replays.claim(digest, timestamp + self.config.replay_window_s, now):
            raise Rejected(401, "replayed request: this signature was already used")
        alert = parse_alert(body, self.config.model_name)
        key = f"{alert.model_name}|{alert.alert_id}"

        def emit() -> str:
            event_id = event_id_for(key, now, self.config.cooldown_s)
            return self._emit(alert, event_id)

        try:
            return alert, self.cooldown.admit(key, emit)
        except Exception as exc:
            self.replays.release(digest)
            log.warning("the Prefect API did not take the event: %s: %s", type(exc).__name__, exc)
            raise Rejected(503, "the Prefect API did not take the event; retry later") from None


# ---------------------------------------------------------------------------------------------
# The ASGI app and the server


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes.

    A declared Content-Length over the limit is refused before reading; a smaller or absent one
    (chunked) is not trusted: the bytes are counted as they arrive.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Rejected(413, f"body over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejected(413, f"body over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(receiver: DriftWebhook) -> Any:
    """The Starlette app: ``POST /hooks/drift`` and ``GET /healthz``."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def drift(request: Request) -> Response:
        client = request.client.host if request.client else "?"
        try:
            timestamp, digest = receiver.check_headers(request.headers)
            try:
                body = await read_body(request, receiver.config.max_body_bytes)
            except ClientDisconnect:
                log.warning("%s disconnected before sending the whole body", client)
                return Response(status_code=400)
            # Emitting is a blocking HTTP call to Prefect, and the cooldown may wait on it.
            alert, admission = await run_in_threadpool(receiver.handle, timestamp, digest, body)
        except Rejected as exc:
            log.warning("refused %d from %s: %s", exc.status, client, exc.reason)
            headers = {"Retry-After": "30"} if exc.status == 503 else None
            return JSONResponse(exc.body(), status_code=exc.status, headers=headers)
        log.info(
            "%s alert %r for model %s from %s: event %s",
            "duplicate" if admission.duplicate else "accepted",
            alert.alert_id,
            alert.model_name,
            alert.source,
            admission.event_id,
        )
        return JSONResponse(
            {"event_id": admission.event_id, "duplicate": admission.duplicate},
            status_code=200 if admission.duplicate else 202,
        )

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route(HOOK_PATH, drift, methods=["POST"]),
            Route(HEALTH_PATH, healthz, methods=["GET"]),
        ]
    )


def load_secret(settings: Settings) -> str:
    """The shared secret, from MLOPS_WEBHOOK_SECRET or a Prefect Secret block; UserError if none.

    The block is read through the Prefect API, so the environment Prefect needs must be set.
    """
    block = (settings.webhook_secret_block or "").strip()
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
    if secret and block:
        raise UserError("set MLOPS_WEBHOOK_SECRET or MLOPS_WEBHOOK_SECRET_BLOCK, not both")
    if block:
        from prefect.blocks.system import Secret

        try:
            value = Secret.load(block).get()
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"cannot read the Prefect Secret block {block!r}: {reason}") from None
        if not isinstance(value, str):
            raise UserError(f"the Prefect Secret block {block!r} does not hold a string")
        secret, origin = value, f"the Prefect Secret block {block!r}"
    else:
        origin = "MLOPS_WEBHOOK_SECRET"
    if not secret.strip():
        raise UserError(
            "no webhook secret: set MLOPS_WEBHOOK_SECRET, or MLOPS_WEBHOOK_SECRET_BLOCK to the "
            "name of a Prefect Secret block"
        )
    if len(secret) < MIN_SECRET_LENGTH:
        raise UserError(f"the secret in {origin} is shorter than {MIN_SECRET_LENGTH} characters")
    return secret


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (port 0 picks a free one); UserError when it cannot bind."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def check_prefect_api(api_url: str) -> None:
    """UserError unless the Prefect API answers its health check: events sent nowhere trigger
    nothing. Prefect's own client is used, with its settings (auth, TLS), as for the events."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        reason = (str(error).strip().splitlines() or [""])[0]
        raise UserError(
            f"the Prefect API at {api_url} does not answer: {type(error).__name__}: {reason}"
        )


def serve(receiver: DriftWebhook, sock: socket.socket, log_level: str = "info") -> None:
    """Serve the app on ``sock`` until interrupted."""
    import copy

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    log_config = copy.deepcopy(LOGGING_CONFIG)  # uvicorn's, plus this module's decisions
    log_config["loggers"][__name__] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    config = uvicorn.Config(
        create_app(receiver),
        log_level=log_level,
        log_config=log_config,
        server_header=False,
        timeout_keep_alive=5,
    )
    uvicorn.Server(config).run(sockets=[sock])
