"""Everything loads: flows import, prefect.yaml parses, entrypoints and parameters resolve."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


def resolve(entrypoint: str):  # type: ignore[no-untyped-def]
    path, name = entrypoint.split(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["name"])
def test_entrypoint_is_a_flow_taking_the_declared_parameters(deployment: dict) -> None:
    from prefect.flows import Flow

    flow = resolve(deployment["entrypoint"])
    assert isinstance(flow, Flow)
    accepted = set(inspect.signature(flow.fn).parameters)
    assert set(deployment.get("parameters", {})) <= accepted
    for schedule in deployment.get("schedules") or []:
        assert set(schedule.get("parameters", {})) <= accepted
    for trigger in deployment.get("triggers") or []:
        assert set(trigger.get("parameters", {})) <= accepted


def test_training_deployment_is_declared_with_a_schedule() -> None:
    training = [d for d in DEPLOYMENTS if d["entrypoint"].endswith(":training_pipeline")]
    assert len(training) == 1
    assert training[0]["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert training[0]["schedules"][0]["cron"]


def test_training_flow_runs_on_ray() -> None:
    from prefect_ray import RayTaskRunner

    from flows.training import training_pipeline

    assert isinstance(training_pipeline.task_runner, RayTaskRunner)


def test_importing_modules_starts_nothing(tmp_path: Path) -> None:
    """In a fresh interpreter: importing every module starts no Ray and reaches no server."""
    import subprocess
    import sys

    code = (
        "import importlib, ray\n"
        "for m in ('flows.training', 'tasks.ingest', 'tasks.validate', 'tasks.transform',\n"
        "          'tasks.tune', 'tasks.register', 'tasks.gate', 'tasks.promote',\n"
        "          'serving.app', 'cli.main', 'flows.drift', 'tasks.drift',\n"
        "          'deployments.webhook', 'deployments.deploy', 'mlops.events',\n"
        "          'cli.sizing', 'serving.control'):\n"
        "    importlib.import_module(m)\n"
        "assert not ray.is_initialized(), 'ray started at import'\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "PREFECT_API_URL": "http://127.0.0.1:9/api",
        "HOME": str(tmp_path),
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_flight_request_is_written_once() -> None:
    """The Serve request schema and request bodies built from raw rows name the core's fields."""
    import pandas as pd

    from mlops.schema import RAW_COLUMNS, REQUEST_COLUMNS, to_requests
    from serving.request import FlightRequest

    assert tuple(FlightRequest.__annotations__) == REQUEST_COLUMNS
    assert set(REQUEST_COLUMNS) <= set(RAW_COLUMNS["flights"])
    row = {c: 1 for c in RAW_COLUMNS["flights"]} | {"carrier": "UA", "tailnum": None}
    assert tuple(to_requests(pd.DataFrame([row]))[0]) == REQUEST_COLUMNS


def test_every_package_says_what_lives_there() -> None:
    tops = [p for p in ROOT.iterdir() if (p / "__init__.py").exists() and p.name != "tests"]
    assert {"cli", "flows", "deployments", "tasks", "serving", "mlops"} <= {p.name for p in tops}
    for init in sorted(i for top in tops for i in top.rglob("__init__.py")):
        doc = init.read_text().strip()
        assert doc.startswith('"""') and doc.endswith('"""') and len(doc) > 10, init


def test_serve_deployment_versions_hash_only_the_code_replicas_run() -> None:
    """A change to a training or upkeep stage, or core code only they use, restarts no router."""
    from mlops.fingerprint import import_closure

    files = import_closure("serving.app", ("serving", "mlops"))
    assert {"serving/app.py", "mlops/features.py", "mlops/registry.py"} <= set(files)
    assert not [f for f in files if f.startswith(("tasks/", "flows/", "cli/", "deployments/"))]
    assert "mlops/backups.py" not in files and "mlops/runtime.py" not in files
