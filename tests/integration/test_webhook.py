"""`mlops webhook` over real HTTP on loopback, against the session's real Prefect API.

Two receivers run as `mlops webhook` subprocesses: one takes its secret from
MLOPS_WEBHOOK_SECRET, the other from a Prefect Secret block. Their alerts name a model unique to
this module, so no deployment trigger of other tests reacts to them. The tests send and check
the answers, recording every accepted alert; then one test reads the events back from the
Prefect API (its event persister writes about every 5 s) and checks that exactly the accepted
alerts became events, each once, and that nothing any refused request carried arrived.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.webhook import sign
from mlops.runtime import Runtime

pytestmark = pytest.mark.integration

MLOPS = str(Path(sys.executable).parent / "mlops")
SECRET = f"webhook-env-secret-{secrets.token_hex(16)}"
BLOCK_SECRET = f"webhook-block-secret-{secrets.token_hex(16)}"
RUN = uuid.uuid4().hex[:8]
MODEL = f"webhook-test-{RUN}"  # the receivers' MLOPS_MODEL_NAME: events about it only
BLOCK_NAME = f"webhook-secret-{RUN}"
DRIFT_EVENT = "mlops.drift.detected"
FLUSH_S = 6.0  # one flush interval of Prefect's event persister, and a little more

# alert id -> event id of every alert a receiver accepted; everything the receivers answered.
ACCEPTED: dict[str, str] = {}
RESPONSES: list[httpx.Response] = []
OUTPUTS: list[str] = []


@dataclass
class Receiver:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def base(self) -> str:
        return self.url.removesuffix("/hooks/drift")


def receiver_env(prefect_api_url: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "MLOPS_MODEL_NAME": MODEL, **extra}
    for key in ("MLOPS_WEBHOOK_SECRET", "MLOPS_WEBHOOK_SECRET_BLOCK"):
        if key not in extra:
            env.pop(key, None)
    return env


def start(env: dict[str, str], log: Path) -> Receiver:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [MLOPS, "webhook", "--port", "0"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    return Receiver("", proc, log)


def wait_listening(rx: Receiver, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = rx.log.read_text(errors="replace")
        for line in text.splitlines():
            if "listening on " in line:
                rx.url = line.split("listening on ", 1)[1].split()[0]
                return
        if rx.proc.poll() is not None:
            pytest.fail(f"mlops webhook exited {rx.proc.returncode}: {text[-2000:]}")
        time.sleep(0.1)
    pytest.fail(f"mlops webhook did not start within {timeout_s:.0f}s")


@pytest.fixture(scope="module")
def receivers(platform: Runtime, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Both receivers, started together: (the env-secret one, the Secret-block one)."""
    from prefect.blocks.system import Secret

    Secret(value=BLOCK_SECRET).save(BLOCK_NAME, overwrite=True)
    logs = tmp_path_factory.mktemp("webhook")
    api = platform.prefect_api_url
    env_rx = start(receiver_env(api, MLOPS_WEBHOOK_SECRET=SECRET), logs / "env.log")
    block_rx = start(receiver_env(api, MLOPS_WEBHOOK_SECRET_BLOCK=BLOCK_NAME), logs / "block.log")
    try:
        wait_listening(env_rx)
        wait_listening(block_rx)
        yield env_rx, block_rx
    finally:
        for rx in (env_rx, block_rx):
            rx.proc.terminate()
            try:
                rx.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                rx.proc.kill()
                rx.proc.wait()


@pytest.fixture(scope="module")
def rx(receivers: tuple[Receiver, Receiver]) -> Receiver:
    return receivers[0]


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    with httpx.Client(timeout=30, limits=limits) as c:
        yield c


def alert(alert_id: str, **changes: Any) -> bytes:
    body = {
        "alert_id": alert_id,
        "window_start": "2013-06-01",
        "window_end": "2013-06-30",
        "scores": {"psi_dep_hour": 0.31},
        "reason": "PSI over 0.2 on the scheduled departure hour",
        "sender": "integration-test",
        **changes,
    }
    return json.dumps(body).encode()


def signed(body: bytes, ts: int | None = None, secret: str = SECRET) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    return {
        "Content-Type": "application/json",
        "X-Mlops-Timestamp": str(ts),
        "X-Mlops-Signature": sign(secret.encode(), ts, body),
    }


def send(client: httpx.Client, url: str, content: Any, headers: dict[str, str]) -> httpx.Response:
    response = client.post(url, content=content, headers=headers)
    RESPONSES.append(response)
    return response


def accepted(response: httpx.Response, alert_id: str) -> str:
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["duplicate"] is False
    ACCEPTED[alert_id] = body["event_id"]
    return body["event_id"]


def test_valid_signed_alert_is_accepted(rx: Receiver, client: httpx.Client) -> None:
    assert client.get(f"{rx.base}/healthz").json() == {"status": "ok"}
    body = alert("valid")
    event_id = accepted(send(client, rx.url, body, signed(body)), "valid")
    assert uuid.UUID(event_id)


def test_identical_request_is_a_replay_and_a_resigned_one_a_duplicate(
    rx: Receiver, client: httpx.Client
) -> None:
    body = alert("replay")
    headers = signed(body)
    event_id = accepted(send(client, rx.url, body, headers), "replay")
    again = send(client, rx.url, body, headers)
    assert again.status_code == 401 and "replayed" in again.json()["detail"]
    resigned = send(client, rx.url, body, signed(body, int(time.time()) - 1))
    assert resigned.status_code == 200
    assert resigned.json() == {"event_id": event_id, "duplicate": True}


def oversized() -> Iterator[bytes]:
    for _ in range(10):
        yield b" " * 8192  # 80 KiB, sent chunked, with no Content-Length


@pytest.mark.parametrize(
    ("case", "status", "detail"),
    [
        ("missing-signature", 401, "missing X-Mlops-Signature"),
        ("missing-timestamp", 401, "missing X-Mlops-Timestamp"),
        ("malformed-signature", 401, "malformed X-Mlops-Signature"),
        ("wrong-signature", 401, "signature mismatch"),
        ("stale-timestamp", 401, "outside the replay window"),
        ("future-timestamp", 401, "outside the replay window"),
        ("oversize", 413, "over the limit of 65536 bytes"),
        ("oversize-chunked", 413, "over the limit of 65536 bytes"),
        ("bad-json", 400, "body is not valid JSON"),
        ("schema", 422, "invalid alert: window_end: "),
        ("other-model", 422, "invalid alert: model: "),
    ],
)
def test_rejected_requests(
    case: str, status: int, detail: str, rx: Receiver, client: httpx.Client
) -> None:
    alert_id = f"rejected-{case}"
    body: Any = alert(alert_id)
    headers = signed(body)
    now = int(time.time())
    if case == "missing-signature":
        del headers["X-Mlops-Signature"]
    elif case == "missing-timestamp":
        del headers["X-Mlops-Timestamp"]
    elif case == "malformed-signature":
        headers["X-Mlops-Signature"] = headers["X-Mlops-Signature"].removeprefix("sha256=")
    elif case == "wrong-signature":
        headers = signed(body, secret=BLOCK_SECRET)
    elif case in ("stale-timestamp", "future-timestamp"):
        headers = signed(body, now - 301 if case.startswith("stale") else now + 301)
    elif case == "oversize":
        body = alert(alert_id, reason="x" * 1000).replace(b"}", b"}" + b" " * 70_000)
        headers = signed(body)
    elif case == "oversize-chunked":
        body = oversized()
    elif case == "bad-json":
        body = body[:-1]
        headers = signed(body)
    elif case == "schema":
        body = alert(alert_id, window_end="2013-05-01")
        headers = signed(body)
    elif case == "other-model":
        body = alert(alert_id, model="flights-delay")  # not the model this receiver retrains
        headers = signed(body)
    response = send(client, rx.url, body, headers)
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"]


def burst(client: httpx.Client, url: str, requests: list[tuple[bytes, dict[str, str]]]) -> list:
    """Send all requests at once, one thread each, released together."""
    gate = threading.Barrier(len(requests))
    out: list[Any] = [None] * len(requests)

    def one(i: int) -> None:
        gate.wait()
        out[i] = send(client, url, *requests[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def test_burst_of_50_same_alert_emits_one_event(rx: Receiver, client: httpx.Client) -> None:
    body = alert("burst")
    now = int(time.time())
    # Re-signed 50 times (each its own timestamp): one is emitted, 49 are duplicates of it.
    responses = burst(client, rx.url, [(body, signed(body, now - i)) for i in range(50)])
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 49 + [202], codes
    assert len({r.json()["event_id"] for r in responses}) == 1
    accepted(next(r for r in responses if r.status_code == 202), "burst")
    # The very same signed request 50 times: one is taken, 49 are replays.
    body = alert("burst-identical")
    headers = signed(body)
    responses = burst(client, rx.url, [(body, headers)] * 50)
    codes = sorted(r.status_code for r in responses)
    assert codes == [202] + [401] * 49, codes
    accepted(next(r for r in responses if r.status_code == 202), "burst-identical")


def test_secret_from_a_prefect_secret_block(
    receivers: tuple[Receiver, Receiver], client: httpx.Client
) -> None:
    block_rx = receivers[1]
    body = alert("from-block")
    wrong = send(client, block_rx.url, body, signed(body, secret=SECRET))
    assert wrong.status_code == 401
    accepted(send(client, block_rx.url, body, signed(body, secret=BLOCK_SECRET)), "from-block")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "mlops webhook needs a shared secret"),
        ({"MLOPS_WEBHOOK_SECRET": "   "}, "mlops webhook needs a shared secret"),
        ({"MLOPS_WEBHOOK_SECRET": "too-short"}, "shorter than 16 characters"),
        ({"MLOPS_WEBHOOK_SECRET": SECRET, "PREFECT_API_URL": ""}, "needs PREFECT_API_URL"),
    ],
)
def test_refuses_to_start(env: dict[str, str], message: str, platform: Runtime) -> None:
    done = subprocess.run(
        [MLOPS, "webhook", "--port", "0"],
        env=receiver_env(platform.prefect_api_url, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    OUTPUTS.extend([done.stdout, done.stderr])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert done.stdout == ""


def read_events(api: str, since: str) -> list[dict[str, Any]]:
    query = {
        "filter": {
            "occurred": {"since": since},
            "event": {"name": [DRIFT_EVENT]},
            "resource": {"id": [f"mlops.model.{MODEL}"]},
        },
        "limit": 50,
    }
    response = httpx.post(f"{api}/events/filter", json=query, timeout=30)
    response.raise_for_status()
    page = response.json()
    assert page["next_page"] is None  # all of this module's events fit in one page
    return page["events"]


def test_exactly_the_accepted_alerts_became_events_once(
    rx: Receiver, client: httpx.Client, platform: Runtime
) -> None:
    since = "2000-01-01T00:00:00Z"  # the model name is unique to this run
    # A sentinel sent last: once it is stored and one more flush has passed, everything any
    # earlier request could have emitted is stored too.
    body = alert("sentinel")
    sentinel = accepted(send(client, rx.url, body, signed(body)), "sentinel")
    deadline = time.monotonic() + 30
    while sentinel not in {e["id"] for e in read_events(platform.prefect_api_url, since)}:
        assert time.monotonic() < deadline, "the sentinel event did not reach Prefect in 30s"
        time.sleep(0.5)
    time.sleep(FLUSH_S)
    events = read_events(platform.prefect_api_url, since)

    by_alert: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_alert.setdefault(event["payload"]["alert_id"], []).append(event)
    assert {k: len(v) for k, v in by_alert.items()} == dict.fromkeys(ACCEPTED, 1)
    assert {k: v[0]["id"] for k, v in by_alert.items()} == ACCEPTED
    assert not any(k.startswith("rejected-") for k in by_alert)

    event = by_alert["valid"][0]
    assert event["event"] == DRIFT_EVENT
    assert event["resource"]["prefect.resource.id"] == f"mlops.model.{MODEL}"
    assert event["payload"] == {
        "model": MODEL,
        "champion_version": None,
        "window_start": "2013-06-01",
        "window_end": "2013-06-30",
        "scores": {"psi_dep_hour": 0.31},
        "reason": "PSI over 0.2 on the scheduled departure hour",
        "source": "webhook:integration-test",
        "alert_id": "valid",
        "retrain_start": "2012-07-01",
        "retrain_end": "2013-06-30",
    }
    assert by_alert["from-block"][0]["payload"]["source"] == "webhook:integration-test"
    OUTPUTS.append(json.dumps(events))


def test_secrets_never_appear_in_responses_or_output(
    receivers: tuple[Receiver, Receiver], client: httpx.Client
) -> None:
    """Everything both receivers answered and logged in this module, including this test's own
    accepted and refused alerts, holds neither secret."""
    env_rx, block_rx = receivers
    body = alert("secrets-check")
    accepted(send(client, env_rx.url, body, signed(body)), "secrets-check")
    assert send(client, env_rx.url, body, signed(body, secret=BLOCK_SECRET)).status_code == 401
    body = alert("secrets-check-block")
    block = send(client, block_rx.url, body, signed(body, secret=BLOCK_SECRET))
    accepted(block, "secrets-check-block")
    deadline = time.monotonic() + 10  # the access log line follows the answer
    logs = ["", ""]
    while time.monotonic() < deadline:
        logs = [rx.log.read_text(errors="replace") for rx in receivers]
        if all("accepted alert 'secrets-check" in log for log in logs):
            break
        time.sleep(0.2)
    assert all('"POST /hooks/drift HTTP/1.1" 202' in log for log in logs)  # logs were written
    assert "refused 401" in logs[0] and "accepted alert 'secrets-check'" in logs[0]
    assert "accepted alert 'secrets-check-block'" in logs[1]
    texts = [r.text for r in RESPONSES] + [str(r.headers) for r in RESPONSES] + logs + OUTPUTS
    assert len(RESPONSES) >= 3
    for secret in (SECRET, BLOCK_SECRET):
        assert not [t for t in texts if secret in t]
