"""The drift webhook's core: signatures, replay, clock skew, the alert schema, the cooldown, bursts.

The app itself runs here in-process (Starlette's TestClient) with a recording emitter, for the
status codes and for what only an emitter that fails can show (503, then a retry that works).
Over real HTTP against a real Prefect API: tests/integration/test_webhook.py.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from deployments.webhook import (
    HOOK_PATH,
    CooldownRegistry,
    DriftWebhook,
    Rejected,
    ReplayCache,
    WebhookConfig,
    create_app,
    event_id_for,
    listen,
    load_secret,
    parse_alert,
    read_auth_headers,
    sign,
    verify_signature,
)
from mlops.errors import UserError
from mlops.events import DriftAlert
from mlops.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
SECRET = "unit-test-secret-5f0c9e1d7a"
KEY = SECRET.encode()
NOW = 1_750_000_000
ALERT = {"alert_id": "psi-2013-06", "window_start": "2013-06-01", "window_end": "2013-06-30"}


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder:
    """An emitter that records what it was asked to send, optionally slowly or failing."""

    def __init__(self, delay_s: float = 0.0, fail: int = 0) -> None:
        self.sent: list[tuple[DriftAlert, uuid.UUID]] = []
        self.delay_s = delay_s
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self, alert: DriftAlert, event_id: uuid.UUID) -> str:
        time.sleep(self.delay_s)
        with self._lock:
            if self.fail:
                self.fail -= 1
                raise ConnectionError("Prefect API unreachable")
            self.sent.append((alert, event_id))
        return str(event_id)


def body_of(alert: dict[str, Any] | None = None, **changes: Any) -> bytes:
    return json.dumps({**(alert or ALERT), **changes}).encode()


def receiver(clock: Clock, emit: Recorder, **config: Any) -> DriftWebhook:
    return DriftWebhook(
        WebhookConfig(secret=KEY, model_name="flights-delay", **config), emit, clock
    )


def handle(hook: DriftWebhook, body: bytes, ts: int, secret: bytes = KEY) -> Any:
    headers = {"X-Mlops-Timestamp": str(ts), "X-Mlops-Signature": sign(secret, ts, body)}
    timestamp, digest = hook.check_headers(headers)
    return hook.handle(timestamp, digest, body)


# --- signatures and clock skew -----------------------------------------------------------------


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"alert_id": "a"}'
    expected = hmac.new(KEY, b"1750000000." + body, hashlib.sha256).hexdigest()
    assert sign(KEY, NOW, body) == f"sha256={expected}"
    assert sign(KEY, str(NOW), body) == sign(KEY, NOW, body)


GOOD = sign(KEY, NOW, b"{}")


@pytest.mark.parametrize(
    ("timestamp", "signature", "reason"),
    [
        (str(NOW), None, "missing X-Mlops-Signature"),
        (None, GOOD, "missing X-Mlops-Timestamp"),
        (str(NOW), "", "missing X-Mlops-Signature"),
        (str(NOW), GOOD.removeprefix("sha256="), "malformed X-Mlops-Signature"),
        (str(NOW), "sha1=" + "0" * 40, "malformed X-Mlops-Signature"),
        (str(NOW), GOOD[:-2], "malformed X-Mlops-Signature"),
        (str(NOW), GOOD[:-1] + "g", "malformed X-Mlops-Signature"),
        ("abc", GOOD, "malformed X-Mlops-Timestamp"),
        ("-5", GOOD, "malformed X-Mlops-Timestamp"),
        ("1750000000.5", GOOD, "malformed X-Mlops-Timestamp"),
        (str(NOW - 301), GOOD, "outside the replay window"),
        (str(NOW + 301), GOOD, "outside the replay window"),
        ("0", GOOD, "outside the replay window"),
    ],
)
def test_headers_refused_with_401(
    timestamp: str | None, signature: str | None, reason: str
) -> None:
    with pytest.raises(Rejected, match=reason) as caught:
        read_auth_headers(timestamp, signature, NOW, 300)
    assert caught.value.status == 401


@pytest.mark.parametrize("skew", [-300, -1, 0, 1, 300])
def test_clock_skew_inside_the_window_is_accepted(skew: int) -> None:
    ts, digest = read_auth_headers(
        str(NOW + skew), GOOD.upper().replace("SHA256", "sha256"), NOW, 300
    )
    assert ts == NOW + skew and digest == GOOD.removeprefix("sha256=")


@pytest.mark.parametrize(
    ("secret", "ts", "body"),
    [
        (b"another-secret-of-some-length", NOW, b"{}"),  # wrong secret
        (KEY, NOW + 1, b"{}"),  # signed for another timestamp
        (KEY, NOW, b"{} "),  # signed for another body
    ],
)
def test_wrong_signature_is_refused(secret: bytes, ts: int, body: bytes) -> None:
    digest = sign(secret, ts, body).removeprefix("sha256=")
    with pytest.raises(Rejected, match="signature mismatch") as caught:
        verify_signature(KEY, NOW, digest, b"{}")
    assert caught.value.status == 401
    verify_signature(KEY, NOW, GOOD.removeprefix("sha256="), b"{}")  # the right one passes


# --- replay ------------------------------------------------------------------------------------


def test_replay_cache_takes_a_signature_once_until_it_expires() -> None:
    cache = ReplayCache()
    assert cache.claim("abc", expires_at=NOW + 300, now=NOW)
    assert not cache.claim("abc", expires_at=NOW + 300, now=NOW + 299)
    cache.release("abc")
    assert cache.claim("abc", expires_at=NOW + 300, now=NOW + 1)
    assert cache.claim("def", expires_at=NOW + 700, now=NOW + 301)  # prunes "abc"
    assert len(cache) == 1


def test_identical_request_is_a_replay_but_a_resigned_one_is_a_duplicate() -> None:
    emit, clock = Recorder(), Clock()
    hook = receiver(clock, emit)
    first = handle(hook, body_of(), NOW)[1]
    assert not first.duplicate
    with pytest.raises(Rejected, match="replayed") as caught:
        handle(hook, body_of(), NOW)
    assert caught.value.status == 401
    clock.now += 5
    again = handle(hook, body_of(), NOW + 5)[1]
    assert again.duplicate and again.event_id == first.event_id
    assert len(emit.sent) == 1


# --- the alert ---------------------------------------------------------------------------------


def test_alert_maps_onto_the_drift_event_contract() -> None:
    body = body_of(scores={"psi": 0.31, "ks": 1}, reason="PSI > 0.2", sender="evidently")
    alert = parse_alert(body, "flights-delay")
    assert alert.model_name == "flights-delay" and alert.source == "webhook:evidently"
    assert alert.scores == {"psi": 0.31, "ks": 1.0} and alert.alert_id == "psi-2013-06"
    payload = alert.payload()
    assert (payload["window_start"], payload["window_end"]) == ("2013-06-01", "2013-06-30")
    assert payload["retrain_end"] == "2013-06-30"
    minimal = parse_alert(body_of(model="flights-delay"), "flights-delay")
    assert minimal.model_name == "flights-delay" and minimal.source == "webhook:unknown"
    assert parse_alert(body_of(window_end="2013-06-01"), "m").window_end.isoformat() == "2013-06-01"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"alert_id": "a", ', "body is not valid JSON"),
        (b"", "body is not valid JSON"),
        (b"\xff\xfe{}", "body is not UTF-8"),
        (b'{"alert_id": NaN}', "NaN is not valid JSON"),
        (b"[" * 5000 + b"]" * 5000, "not valid JSON"),
    ],
)
def test_malformed_json_is_400_with_the_reason(body: bytes, reason: str) -> None:
    with pytest.raises(Rejected, match=reason) as caught:
        parse_alert(body, "flights-delay")
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"alert_id": None}, "alert_id"),
        ({"alert_id": ""}, "alert_id"),
        ({"alert_id": 7}, "alert_id"),
        ({"alert_id": "a\nb"}, "alert_id"),
        ({"window_start": None}, "window_start"),
        ({"window_end": "2013-02-30"}, "window_end"),
        ({"window_end": "30/06/2013"}, "window_end"),
        ({"window_end": 1372550400}, "window_end"),
        ({"window_end": "2013-05-31"}, "window_end"),  # before window_start
        ({"scores": {"psi": "high"}}, "scores.psi"),
        ({"scores": {"psi": True}}, "scores.psi"),
        ({"scores": [0.3]}, "scores"),
        ({"model": "another-model"}, "model"),  # the receiver retrains one model
        ({"model": ""}, "model"),
        ({"sender": "x" * 101}, "sender"),
        ({"reason": 5}, "reason"),
        ({"windowstart": "2013-06-01"}, "windowstart"),  # unknown fields are refused
    ],
)
def test_schema_failure_is_422_naming_the_field(changes: dict[str, Any], field: str) -> None:
    alert = {k: v for k, v in {**ALERT, **changes}.items() if v is not None}
    with pytest.raises(Rejected) as caught:
        parse_alert(json.dumps(alert).encode(), "flights-delay")
    assert caught.value.status == 422
    assert caught.value.reason.startswith(f"invalid alert: {field}: ")
    assert caught.value.errors and caught.value.errors[0]["loc"] == field.split(".")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ([ALERT], "expected a JSON object, got list"),
        ({"version": "4", "groupKey": "{}", "alerts": []}, "Alertmanager's native payload"),
    ],
)
def test_other_shapes_are_422(data: Any, reason: str) -> None:
    with pytest.raises(Rejected, match=reason) as caught:
        parse_alert(json.dumps(data).encode(), "flights-delay")
    assert caught.value.status == 422


# --- cooldown and bursts -----------------------------------------------------------------------


def test_cooldown_emits_once_per_key_and_again_after_it() -> None:
    emit, clock = Recorder(), Clock()
    hook = receiver(clock, emit, cooldown_s=3600)
    first = handle(hook, body_of(), NOW)[1]
    clock.now += 3599
    dup = handle(hook, body_of(reason="still drifting"), NOW + 3599)[1]
    other = handle(hook, body_of(alert_id="ks-2013-06"), NOW + 3599)[1]
    clock.now += 1
    later = handle(hook, body_of(), NOW + 3600)[1]
    assert dup.duplicate and dup.event_id == first.event_id
    assert not other.duplicate and not later.duplicate
    assert len({first.event_id, other.event_id, later.event_id}) == 3
    assert [str(i) for _, i in emit.sent] == [first.event_id, other.event_id, later.event_id]


def test_event_ids_are_deterministic_per_key_and_cooldown_bucket() -> None:
    a = event_id_for("flights-delay|a", NOW, 3600)
    assert a == event_id_for("flights-delay|a", NOW - NOW % 3600 + 3599, 3600)
    assert a != event_id_for("flights-delay|a", NOW + 3600, 3600)
    assert a != event_id_for("flights-delay|b", NOW, 3600)
    assert a != event_id_for("other|a", NOW, 3600)


def burst(n: int, target: Any) -> list[Any]:
    """Run ``target(i)`` in ``n`` threads released together; results or exceptions, in order."""
    start = threading.Barrier(n)
    out: list[Any] = [None] * n

    def run(i: int) -> None:
        start.wait()
        try:
            out[i] = target(i)
        except Exception as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


def test_burst_of_50_same_key_emits_once() -> None:
    emit = Recorder(delay_s=0.05)
    registry = CooldownRegistry(3600, Clock())
    results = burst(50, lambda i: registry.admit("m|a", lambda: emit(None, uuid.uuid4())))  # type: ignore[arg-type]
    assert len(emit.sent) == 1
    assert {r.event_id for r in results} == {str(emit.sent[0][1])}
    assert sum(not r.duplicate for r in results) == 1


def test_burst_of_50_resigned_requests_through_the_receiver_emits_once() -> None:
    emit, clock = Recorder(delay_s=0.05), Clock()
    hook = receiver(clock, emit)
    results = burst(50, lambda i: handle(hook, body_of(), NOW - i)[1])
    assert len(emit.sent) == 1
    assert sum(not r.duplicate for r in results) == 1
    assert {r.event_id for r in results} == {str(emit.sent[0][1])}


def test_burst_of_50_identical_requests_one_accepted_49_replays() -> None:
    emit = Recorder(delay_s=0.02)
    hook = receiver(Clock(), emit)
    results = burst(50, lambda i: handle(hook, body_of(), NOW)[1])
    refused = [r for r in results if isinstance(r, Rejected)]
    assert len(refused) == 49 and {r.status for r in refused} == {401}
    assert len(emit.sent) == 1


def test_a_slow_emission_does_not_hold_up_other_alerts() -> None:
    registry = CooldownRegistry(3600, Clock())
    release = threading.Event()

    def slow() -> str:
        release.wait(10)
        return "slow"

    t = threading.Thread(target=registry.admit, args=("m|slow", slow))
    t.start()
    time.sleep(0.05)
    started = time.monotonic()
    assert registry.admit("m|fast", lambda: "fast").event_id == "fast"
    assert time.monotonic() - started < 1
    release.set()
    t.join(5)


def test_failed_emission_is_503_records_nothing_and_the_identical_retry_works() -> None:
    emit, clock = Recorder(fail=1), Clock()
    hook = receiver(clock, emit)
    with pytest.raises(Rejected, match="Prefect API") as caught:
        handle(hook, body_of(), NOW)
    assert caught.value.status == 503 and emit.sent == []
    accepted = handle(hook, body_of(), NOW)[1]  # the very same signed request
    assert not accepted.duplicate and len(emit.sent) == 1


def test_burst_while_prefect_fails_emits_at_most_once_and_nothing_is_lost() -> None:
    emit = Recorder(delay_s=0.01, fail=3)
    hook = receiver(Clock(), emit)
    results = burst(20, lambda i: handle(hook, body_of(), NOW - i)[1])
    unavailable = [r for r in results if isinstance(r, Rejected)]
    assert len(unavailable) == 3 and {r.status for r in unavailable} == {503}
    assert len(emit.sent) == 1


# --- the app, in-process -----------------------------------------------------------------------


class AppClient:
    """The app in-process over httpx's ASGI transport, with a recording emitter and a clock."""

    def __init__(self, emit: Recorder, clock: Clock, app: Any) -> None:
        self.emit, self.clock, self.app = emit, clock, app

    def request(self, method: str, path: str, content: Any = None, **headers: str) -> Any:
        import asyncio

        import httpx

        async def call() -> Any:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://hook") as client:
                response = await client.request(method, path, content=content, headers=headers)
                await response.aread()
                return response

        return asyncio.run(call())


@pytest.fixture
def app_client(caplog: pytest.LogCaptureFixture) -> AppClient:
    caplog.set_level(logging.DEBUG)
    emit, clock = Recorder(), Clock(time.time())
    return AppClient(emit, clock, create_app(receiver(clock, emit, max_body_bytes=1024)))


def post(client: AppClient, body: Any, ts: int | None = None, **headers: str) -> Any:
    ts = int(client.clock.now) if ts is None else ts
    raw = body if isinstance(body, bytes) else b""
    signed = {"X-Mlops-Timestamp": str(ts), "X-Mlops-Signature": sign(KEY, ts, raw)}
    return client.request("POST", HOOK_PATH, body, **{**signed, **headers})


async def chunked(*parts: bytes) -> Any:
    for part in parts:
        yield part


def test_app_status_codes(app_client: AppClient, caplog: pytest.LogCaptureFixture) -> None:
    c, now = app_client, int(app_client.clock.now)
    responses = []

    def check(response: Any, status: int, text: str = "") -> Any:
        responses.append(response)
        assert response.status_code == status, response.text
        assert text in response.text
        return response

    accepted = check(post(c, body_of()), 202).json()
    assert accepted["duplicate"] is False and uuid.UUID(accepted["event_id"])
    dup = check(post(c, body_of(), ts=now - 1), 200).json()
    assert dup == {"event_id": accepted["event_id"], "duplicate": True}
    check(post(c, body_of(), ts=now - 1), 401, "replayed")
    check(c.request("POST", HOOK_PATH, body_of(alert_id="x")), 401, "missing")
    check(post(c, body_of(alert_id="x"), **{"X-Mlops-Signature": "sha256=zz"}), 401, "malformed")
    check(post(c, body_of(alert_id="x"), **{"X-Mlops-Signature": sign(b"k" * 16, now, b"")}), 401)
    check(post(c, body_of(alert_id="x"), ts=now - 301), 401, "replay window")
    check(post(c, b"x" * 1025), 413, "over the limit of 1024 bytes")
    chunks = chunked(b"x" * 600, b"x" * 600)  # no Content-Length: counted while reading
    check(post(c, chunks, **{"X-Mlops-Signature": sign(KEY, now, b"x" * 1200)}), 413)
    check(post(c, b'{"alert_id": '), 400, "not valid JSON")
    check(post(c, body_of(window_end="2013-01-01")), 422, "window_end")
    assert c.request("GET", "/healthz").json() == {"status": "ok"}
    assert c.request("GET", HOOK_PATH).status_code == 405
    assert len(c.emit.sent) == 1
    for text in [r.text for r in responses] + [str(r.headers) for r in responses] + [caplog.text]:
        assert SECRET not in text


def test_app_answers_503_when_prefect_fails_then_the_retry_is_accepted(
    app_client: AppClient,
) -> None:
    app_client.emit.fail = 1
    ts = int(app_client.clock.now)
    refused = post(app_client, body_of(), ts=ts)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "30"
    assert post(app_client, body_of(), ts=ts).status_code == 202
    assert len(app_client.emit.sent) == 1


# --- configuration -----------------------------------------------------------------------------


def test_settings_read_the_webhook_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    assert (defaults.webhook_host, defaults.webhook_port) == ("127.0.0.1", 8787)
    assert defaults.webhook_max_body_bytes == 65536 and defaults.webhook_replay_window_s == 300
    monkeypatch.setenv("MLOPS_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("MLOPS_WEBHOOK_PORT", "9000")
    monkeypatch.setenv("MLOPS_WEBHOOK_COOLDOWN_S", "60")
    settings = load_settings()
    assert settings.webhook_port == 9000 and settings.webhook_cooldown_s == 60
    assert settings.webhook_secret is not None
    assert settings.webhook_secret.get_secret_value() == SECRET
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())
    config = WebhookConfig.from_settings(settings, load_secret(settings))
    assert config.secret == KEY and config.cooldown_s == 60 and SECRET not in repr(config)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "no webhook secret"),
        ({"MLOPS_WEBHOOK_SECRET": "   "}, "no webhook secret"),
        ({"MLOPS_WEBHOOK_SECRET": "short-secret"}, "shorter than 16"),
        ({"MLOPS_WEBHOOK_SECRET": SECRET, "MLOPS_WEBHOOK_SECRET_BLOCK": "b"}, "not both"),
    ],
)
def test_missing_or_weak_secret_is_a_user_error(
    env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match=message) as caught:
        load_secret(load_settings())
    assert SECRET not in str(caught.value) and "short-secret" not in str(caught.value)


def test_listen_binds_a_free_port_and_refuses_a_taken_one() -> None:
    sock = listen("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert port > 0
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}"):
            listen("127.0.0.1", port)
    finally:
        sock.close()


def test_importing_the_receiver_starts_nothing() -> None:
    """In a fresh interpreter: importing it loads neither Prefect nor the server libraries."""
    code = (
        "import sys\n"
        "import deployments.webhook\n"
        "loaded = {'prefect', 'uvicorn', 'starlette', 'httpx'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
