"""The daily health checks, each a plain function returning one report row.

A check raises :class:`CheckFailed` for a definite finding (not retried) and lets transient errors
through (retried by its Prefect wrapper). The flow turns whatever a check ended with into a row.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from mlops.errors import CheckFailed
from mlops.lake import SCRATCH
from mlops.registry import CHAMPION
from mlops.results import OK, SKIPPED, CheckResult
from mlops.settings import Settings
from mlops.storage import Storage
from tasks.maintenance.core import (
    FailedRun,
    ResourceMinimums,
    group_failures,
    merge_history,
    resource_shortfalls,
    utilization_trend,
)


def _gb(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def ray_resources(minimums: ResourceMinimums) -> CheckResult:
    import ray

    resources = ray.cluster_resources()
    figure = (
        f"{resources.get('CPU', 0):.0f} CPU, {resources.get('GPU', 0):.0f} GPU, "
        f"{_gb(resources.get('memory', 0))}"
    )
    short = resource_shortfalls(resources, minimums)
    if short:
        raise CheckFailed(f"below minimums: {'; '.join(short)}")
    avail = ray.available_resources()
    detail = (
        f"object store {_gb(resources.get('object_store_memory', 0))}; "
        f"available now {avail.get('CPU', 0):.1f} CPU; minimums {asdict(minimums)}"
    )
    return CheckResult("ray_resources", OK, figure, detail)


def storage_roundtrip(settings: Settings, roots: Sequence[str]) -> CheckResult:
    """Write, read back and delete a small object under each root."""
    timings = []
    for root in roots:
        storage = Storage(root, settings.storage_options)
        rel = posixpath.join(SCRATCH, f"roundtrip-{uuid.uuid4().hex}")
        payload = uuid.uuid4().bytes * 64
        t0 = time.monotonic()
        storage.write_bytes(rel, payload)
        back = storage.read_bytes(rel)
        storage.delete(rel)
        if back != payload:
            raise CheckFailed(f"{root}: read back different bytes")
        if storage.exists(rel):
            raise CheckFailed(f"{root}: delete left the object behind")
        timings.append(f"{root} {1000 * (time.monotonic() - t0):.0f} ms")
    return CheckResult("storage_roundtrip", OK, f"{len(roots)} roots", "; ".join(timings))


def mlflow_champion(settings: Settings) -> CheckResult:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    client.search_experiments(max_results=1)  # reachable (a transient error here is retried)
    try:
        mv = client.get_model_version_by_alias(settings.model_name, CHAMPION)
    except MlflowException:
        raise CheckFailed(f"no '{CHAMPION}' alias on {settings.model_name}") from None
    return CheckResult(
        "mlflow_champion", OK, f"champion v{mv.version}", f"{settings.model_name}@{CHAMPION}"
    )


def serve_app_status(app_name: str) -> str | None:
    """The application's status, or None when Serve or the application is not running."""
    from ray import serve

    try:
        apps = serve.status().applications
    except Exception:
        return None
    app = apps.get(app_name)
    return str(getattr(app.status, "value", app.status)) if app else None


def serving(settings: Settings, require_serve: bool) -> CheckResult:
    """The Serve application is RUNNING and answers a real prediction with the champion."""
    import httpx

    from mlops.schema import drill_requests

    status = serve_app_status(settings.serve_app_name)
    if status is None:
        msg = (
            f"no Serve application '{settings.serve_app_name}' is running on this Ray "
            "(embedded mode keeps no long-lived Serve; point RAY_ADDRESS at a serving cluster)"
        )
        if require_serve:
            raise CheckFailed(msg)
        return CheckResult("serving", SKIPPED, "not running", msg)
    if status != "RUNNING":
        raise CheckFailed(f"application '{settings.serve_app_name}' is {status}")
    requests = drill_requests(4)
    t0 = time.monotonic()
    resp = httpx.post(f"{settings.serve_url}/predict", json=requests, timeout=30)
    ms = 1000 * (time.monotonic() - t0)
    if resp.status_code != 200:
        raise CheckFailed(f"POST /predict answered HTTP {resp.status_code}")
    body = resp.json()
    if len(body.get("predictions", [])) != len(requests):
        raise CheckFailed("POST /predict returned the wrong number of predictions")
    from mlops.registry import ModelRegistry

    champion = ModelRegistry(settings).alias_version(CHAMPION)
    if champion is not None and body.get("version") != champion:
        raise CheckFailed(f"serving version {body.get('version')}, champion is v{champion}")
    return CheckResult(
        "serving",
        OK,
        f"RUNNING v{body.get('version')}",
        f"{len(requests)} predictions in {ms:.0f} ms at {settings.serve_url}/predict",
    )


def prefect_api(api_url: str) -> CheckResult:
    import httpx

    t0 = time.monotonic()
    resp = httpx.get(f"{api_url.rstrip('/')}/health", timeout=10)
    if resp.status_code != 200:
        raise CheckFailed(f"{api_url}/health answered HTTP {resp.status_code}")
    return CheckResult(
        "prefect_api", OK, f"{1000 * (time.monotonic() - t0):.0f} ms", f"{api_url} healthy"
    )


def measure_utilization(home: Path) -> dict[str, Any]:
    import subprocess

    import psutil

    disk = shutil.disk_usage(home)
    out: dict[str, Any] = {
        "cpu_percent": psutil.cpu_percent(interval=0.5),
        "load_1m": round(os.getloadavg()[0], 2),
        "memory_percent": psutil.virtual_memory().percent,
        "disk_percent": round(100 * disk.used / disk.total, 1),
        "disk_free_gb": round(disk.free / 1024**3, 2),
        "gpu_count": 0,
    }
    if shutil.which("nvidia-smi"):
        try:
            done = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used,memory.total",
                 "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            gpus = [line.split(",") for line in done.stdout.strip().splitlines() if line]
            if gpus:
                out["gpu_count"] = len(gpus)
                out["gpu_percent"] = sum(float(g[0]) for g in gpus) / len(gpus)
                out["gpu_memory_percent"] = round(
                    100 * sum(float(g[1]) for g in gpus) / sum(float(g[2]) for g in gpus), 1
                )
        except (OSError, ValueError, subprocess.SubprocessError, ZeroDivisionError):
            pass
    return out


def utilization(settings: Settings, run_date: str, max_disk_percent: float) -> CheckResult:
    """CPU, GPU, memory and disk now, and the change against the mean of previous runs."""
    path = settings.home / "maintenance" / "utilization.json"
    history = json.loads(path.read_text()) if path.exists() else []
    current = {"run_date": run_date, **measure_utilization(settings.home)}
    trend = utilization_trend(history, current)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(merge_history(history, current), indent=2))
    os.replace(tmp, path)
    figure = (
        f"cpu {current['cpu_percent']:.0f}% mem {current['memory_percent']:.0f}% "
        f"disk {current['disk_percent']:.0f}%"
    )
    gpu = (
        f"gpu {current.get('gpu_percent', 0):.0f}% of {current['gpu_count']}"
        if current["gpu_count"]
        else "no GPU"
    )
    trend_text = (
        ", ".join(f"{k} {v:+g}" for k, v in trend.items() if k != "gpu_count") or "first run"
    )
    detail = f"{gpu}; vs previous runs: {trend_text}; history {path}"
    if current["disk_percent"] > max_disk_percent:
        raise CheckFailed(f"disk {current['disk_percent']}% used > {max_disk_percent}%; {detail}")
    return CheckResult("utilization", OK, figure, detail)


def read_failed_runs(since: datetime, until: datetime) -> list[FailedRun]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterId,
        FlowRunFilter,
        FlowRunFilterStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.FAILED, StateType.CRASHED])
                ),
                start_time=FlowRunFilterStartTime(after_=since, before_=until),
            ),
            limit=200,
        )
        ids = list({r.flow_id for r in runs})
        flows = client.read_flows(flow_filter=FlowFilter(id=FlowFilterId(any_=ids))) if ids else []
    names = {f.id: f.name for f in flows}
    return [
        FailedRun(
            names.get(r.flow_id, str(r.flow_id)),
            (r.state.message if r.state else "") or "",
            r.state.type.value if r.state else "UNKNOWN",
            str(r.start_time),
        )
        for r in runs
    ]


def error_review(now: datetime, hours: float, max_failed_runs: int) -> CheckResult:
    """Failed or crashed flow runs in the window, grouped by flow and first error line."""
    runs = read_failed_runs(now - timedelta(hours=hours), now)
    groups = group_failures(runs)
    detail = "; ".join(f"{g.flow} x{g.count}: {g.first_line}" for g in groups[:5]) or "none"
    if len(runs) > max_failed_runs:
        raise CheckFailed(
            f"{len(runs)} failed/crashed flow runs in {hours:g} h (max {max_failed_runs}): {detail}"
        )
    return CheckResult("error_log", OK, f"{len(runs)} failed runs / {hours:g} h", detail)
