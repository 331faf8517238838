"""prefect.yaml against a real `prefect server start`: deploy, schedules, triggers, runs.

The sequence is the README's: start a server, `mlops deploy` (work pool + `prefect deploy
--all`), `prefect worker start`, `prefect deployment run 'training-pipeline/training'`.
"""

from __future__ import annotations

import datetime as dt
import secrets
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlops.runtime import free_port
from tests.integration.servers import (
    BIN,
    base_env,
    early_or_now,
    prefect_client,
    prefect_server,
    run_deployment_on_a_worker,
    start_early,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
DEPLOYED_AT: list[dt.datetime] = []
TRAINING = next(d for d in SPEC if d["entrypoint"].endswith(":training_pipeline"))


# The server starts while the module before this one runs (it waits for nothing of theirs).
start_early(__name__, lambda: prefect_server(Path(tempfile.mkdtemp(prefix="prefect-server-"))))


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with early_or_now(__name__) as url:
        yield url


@pytest.fixture(scope="module")
def user_env(server: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What a user's shell holds: the server's URL and a state directory of their own."""
    home = tmp_path_factory.mktemp("deploy-home")
    env = base_env(
        PREFECT_API_URL=server,
        PREFECT_HOME=str(home / "prefect"),
        MLOPS_HOME=str(home / "mlops"),
        MLOPS_SERVE_PORT=str(free_port()),
        MLOPS_RAY_NUM_CPUS="2",
        # One router replica, as in the rest of the suite (tests/conftest.py): each replica
        # loads the model, seconds on the 2-core test machine. The production profile runs 2.
        MLOPS_SERVE_ROUTER_REPLICAS="1",
    )
    for var in ("MLOPS_EMBEDDED_PREFECT", "RAY_ADDRESS", "AWS_ENDPOINT_URL", "MLOPS_STORAGE_ROOT"):
        env.pop(var, None)
    return env


def mlops(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "mlops"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )


@pytest.fixture(scope="module")
def deployed(user_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    DEPLOYED_AT.append(dt.datetime.now(dt.UTC))
    done = mlops(user_env, "deploy")
    assert done.returncode == 0, done.stderr
    return done


def deployments_by_name(url: str) -> dict[str, Any]:
    with prefect_client(url) as c:
        return {d.name: d for d in c.read_deployments()}


def flow_runs(url: str, deployment_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with prefect_client(url) as c:
        return c.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )


def test_deploy_registers_every_deployment_and_creates_the_pool(
    deployed: subprocess.CompletedProcess[str], server: str
) -> None:
    assert "created work pool 'mlops-process'" in deployed.stdout
    held = deployments_by_name(server)
    assert set(held) == {d["name"] for d in SPEC}
    with prefect_client(server) as c:
        for d in SPEC:
            dep = held[d["name"]]
            assert dep.work_pool_name == d["work_pool"]["name"]
            assert c.read_work_pool(d["work_pool"]["name"]).type == "process"
            assert dep.parameters == d["parameters"]
            assert dep.entrypoint == d["entrypoint"]
            assert f"{c.read_flow(dep.flow_id).name}/{d['name']}" in deployed.stdout
    training = held[TRAINING["name"]]
    assert training.global_concurrency_limit.limit == 1
    assert training.concurrency_options.collision_strategy.value == "CANCEL_NEW"


def test_deploy_is_idempotent(
    deployed: subprocess.CompletedProcess[str], server: str, user_env: dict[str, str]
) -> None:
    before = {n: d.id for n, d in deployments_by_name(server).items()}
    again = mlops(user_env, "deploy")
    assert again.returncode == 0, again.stderr
    assert "created work pool" not in again.stdout
    assert {n: d.id for n, d in deployments_by_name(server).items()} == before
    training = deployments_by_name(server)[TRAINING["name"]]
    with prefect_client(server) as c:  # a re-deploy must not add a second trigger
        assert len(c.read_resource_related_automations(f"prefect.deployment.{training.id}")) == 1


def test_deploy_without_a_reachable_server_is_one_line_exit_2(user_env: dict[str, str]) -> None:
    unset = {k: v for k, v in user_env.items() if k != "PREFECT_API_URL"}
    done = mlops(unset, "deploy")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "PREFECT_API_URL is not set" in done.stderr
    down = {**user_env, "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    done = mlops(down, "deploy")
    assert done.returncode == 2 and "no Prefect server answers" in done.stderr
    done = mlops(user_env, "deploy", "--name", "no-such-deployment")
    assert done.returncode == 2 and "no deployment named no-such-deployment" in done.stderr


def expected_cron_times(cron: str, after: dt.datetime, count: int) -> list[dt.datetime]:
    """The next times a five-field cron (numbers, '*', lists, '*/n') fires, by brute force."""

    def field(spec: str, lo: int, hi: int) -> set[int]:
        values: set[int] = set()
        for part in spec.split(","):
            if part == "*":
                values |= set(range(lo, hi + 1))
            elif part.startswith("*/"):
                values |= set(range(lo, hi + 1, int(part[2:])))
            else:
                values.add(int(part))
        return values

    minute, hour, dom, month, dow = cron.split()
    m, h = field(minute, 0, 59), field(hour, 0, 23)
    d, mo, w = field(dom, 1, 31), field(month, 1, 12), field(dow, 0, 6)
    t = after.astimezone(dt.UTC).replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    out = []
    while len(out) < count:
        cron_dow = (t.weekday() + 1) % 7  # cron: Sunday is 0
        if t.minute in m and t.hour in h and t.day in d and t.month in mo and cron_dow in w:
            out.append(t)
        t += dt.timedelta(minutes=1)
    return out


@pytest.mark.parametrize("name", [d["name"] for d in SPEC if d.get("schedules")])
def test_schedules_parse_and_the_server_plans_the_runs_the_file_says(
    deployed: subprocess.CompletedProcess[str], server: str, name: str
) -> None:
    spec = next(d for d in SPEC if d["name"] == name)
    dep = deployments_by_name(server)[name]
    assert [(s.schedule.cron, s.schedule.timezone) for s in dep.schedules] == [
        (s["cron"], s.get("timezone", "UTC")) for s in spec["schedules"]
    ]
    assert all(s.active for s in dep.schedules)
    # The server's scheduler service creates the next runs; they must be the cron's times.
    deadline = time.monotonic() + 30
    while True:
        planned = sorted(
            r.expected_start_time for r in flow_runs(server, dep.id) if r.state_name == "Scheduled"
        )
        if len(planned) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(planned) >= 3, f"the scheduler planned {len(planned)} runs of {name}"
    expected = expected_cron_times(spec["schedules"][0]["cron"], DEPLOYED_AT[0], 3)
    assert [dt.datetime.fromtimestamp(p.timestamp(), dt.UTC) for p in planned[:3]] == expected
    scheduled_params = spec["schedules"][0].get("parameters", {})
    for run in flow_runs(server, dep.id):
        for key, value in scheduled_params.items():
            assert run.parameters[key] == value


def test_training_trigger_is_an_event_trigger_on_drift(
    deployed: subprocess.CompletedProcess[str], server: str
) -> None:
    dep = deployments_by_name(server)[TRAINING["name"]]
    with prefect_client(server) as c:
        automations = c.read_resource_related_automations(f"prefect.deployment.{dep.id}")
    assert len(automations) == 1
    trigger = automations[0].trigger
    assert trigger.expect == {"mlops.drift.detected"}
    action = automations[0].actions[0]
    assert action.deployment_id == dep.id
    assert action.parameters == TRAINING["triggers"][0]["parameters"]


def wait_for_runs(url: str, deployment_id: Any, match: Any, count: int, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while True:
        runs = [r for r in flow_runs(url, deployment_id) if match(r)]
        if len(runs) >= count or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def test_a_drift_event_starts_exactly_one_training_run_with_its_window(
    deployed: subprocess.CompletedProcess[str], server: str
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from mlops.events import DriftAlert, emit_drift

    alert = DriftAlert(
        "flights-delay", dt.date(2013, 12, 1), dt.date(2013, 12, 21), "test", "3", {"psi": 0.4}
    )
    with temporary_settings({PREFECT_API_URL: server}):
        event_id = emit_drift(alert)
    dep = deployments_by_name(server)[TRAINING["name"]]

    def triggered(run: Any) -> bool:
        return run.parameters.get("triggered_by") == f"drift:{event_id}"

    runs = wait_for_runs(server, dep.id, triggered, 1, timeout=30)
    time.sleep(3)  # a second run, if one were coming, arrives within the same moment
    runs = [r for r in flow_runs(server, dep.id) if triggered(r)]
    assert len(runs) == 1
    assert runs[0].parameters["start"] == "2012-12-22"  # the trailing 365 days
    assert runs[0].parameters["end"] == "2013-12-21"
    assert runs[0].parameters["trials"] == TRAINING["parameters"]["trials"]


def test_signed_webhook_alerts_start_one_training_run_and_rejected_ones_none(
    deployed: subprocess.CompletedProcess[str],
    server: str,
    user_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """`mlops webhook` -> event -> the training trigger, end to end on the real server."""
    import json
    import threading

    import httpx

    from deployments.webhook import sign

    secret = secrets.token_hex(24)
    dep = deployments_by_name(server)[TRAINING["name"]]

    def drift_runs() -> list[Any]:
        return [
            r
            for r in flow_runs(server, dep.id)
            if str(r.parameters.get("triggered_by", "")).startswith("drift:")
        ]

    before = {r.id for r in drift_runs()}
    log = tmp_path / "webhook.log"
    env = {**user_env, "MLOPS_WEBHOOK_SECRET": secret}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlops"), "webhook", "--port", "0"], env=env, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 60
        while "listening on " not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        url = log.read_text().split("listening on ", 1)[1].split()[0]
        body = json.dumps(
            {
                "alert_id": f"e2e-{secrets.token_hex(4)}",
                "window_start": "2013-11-01",
                "window_end": "2013-11-30",
                "scores": {"psi": 0.42},
                "sender": "e2e",
            }
        ).encode()

        def headers(ts: int, key: str = secret) -> dict[str, str]:
            return {
                "Content-Type": "application/json",
                "X-Mlops-Timestamp": str(ts),
                "X-Mlops-Signature": sign(key.encode(), ts, body),
            }

        now = int(time.time())
        rejected = [
            httpx.post(url, content=body, headers=headers(now, "not-the-secret" * 2)),
            httpx.post(url, content=body, headers=headers(now - 3600)),
            httpx.post(url, content=body, headers={"Content-Type": "application/json"}),
            httpx.post(url, content=b"{not json", headers=headers(now)),
        ]
        assert [r.status_code for r in rejected] == [401, 401, 401, 401], [r.text for r in rejected]
        gate = threading.Barrier(50)
        answers: list[Any] = [None] * 50

        def one(i: int) -> None:  # the same alert, re-signed by each sender, all at once
            gate.wait()
            answers[i] = httpx.post(url, content=body, headers=headers(now + i % 3), timeout=60)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        codes = sorted(a.status_code for a in answers)
        assert codes.count(202) == 1 and set(codes) <= {200, 202, 401}, codes
        event_id = next(a.json()["event_id"] for a in answers if a.status_code == 202)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert secret not in log.read_text()

    def triggered(run: Any) -> bool:
        return run.id not in before and str(run.parameters.get("triggered_by")).startswith("drift")

    wait_for_runs(server, dep.id, triggered, 1, timeout=30)
    time.sleep(5)  # one more persister flush: a second run would show up now
    new = [r for r in drift_runs() if r.id not in before]
    assert len(new) == 1, [r.parameters for r in new]
    assert new[0].parameters["triggered_by"] == f"drift:{event_id}"
    assert (new[0].parameters["start"], new[0].parameters["end"]) == ("2012-12-01", "2013-11-30")


def test_concurrency_limit_cancels_a_second_training_run(
    deployed: subprocess.CompletedProcess[str], server: str
) -> None:
    """CANCEL_NEW: while one training run holds the slot, the next one is cancelled, not run."""
    from prefect.states import Completed, Pending, Running

    dep = deployments_by_name(server)[TRAINING["name"]]
    with prefect_client(server) as c:
        first = c.create_flow_run_from_deployment(dep.id, tags=["concurrency-test"])
        second = c.create_flow_run_from_deployment(dep.id, tags=["concurrency-test"])
        assert c.set_flow_run_state(first.id, Pending()).state.is_pending()
        assert c.set_flow_run_state(first.id, Running()).state.is_running()
        blocked = c.set_flow_run_state(second.id, Pending())
        assert blocked.state.is_cancelled(), blocked
        assert "concurrency limit" in (blocked.state.message or "")
        c.set_flow_run_state(first.id, Completed())
        third = c.create_flow_run_from_deployment(dep.id, tags=["concurrency-test"])
        assert c.set_flow_run_state(third.id, Pending()).state.is_pending()  # slot released
        c.set_flow_run_state(third.id, Completed(), force=True)


def test_a_deployment_run_started_by_name_completes_on_a_worker(
    deployed: subprocess.CompletedProcess[str],
    server: str,
    user_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """`prefect deployment run` with an override, executed by a process worker, to the end."""
    with prefect_client(server) as c:  # nothing else may reach the worker meanwhile
        for dep in c.read_deployments():
            for schedule in dep.schedules:
                c.update_deployment_schedule(dep.id, schedule.id, active=False)
        for run in c.read_flow_runs():
            if run.state and run.state.is_scheduled():
                c.delete_flow_run(run.id)
    run = run_deployment_on_a_worker(
        f"training-pipeline/{TRAINING['name']}",
        {"trials": 2, "max_rounds": 20, "start": "2013-03-01", "end": "2013-03-14"},
        user_env,
        tmp_path,
        timeout=300,
    )
    run_id = str(run.id)
    assert run.parameters["trials"] == 2 and run.parameters["start"] == "2013-03-01"
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{user_env['MLOPS_HOME']}/mlflow.db"
    versions = MlflowClient(uri, registry_uri=uri).search_model_versions("name='flights-delay'")
    assert len(versions) == 1
    tags = versions[0].tags
    assert tags["prefect_flow_run_id"] == run_id
    assert tags["data_window"] == "2013-03-01..2013-03-14"
    assert tags["trigger"] == "manual"
