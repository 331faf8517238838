"""Daily maintenance checks: each a task with retries, each one row of the report.

A check raises :class:`CheckFailed` for a definite finding (not retried) and lets transient errors
through (retried). The flow turns whatever a check ended with into a :class:`CheckResult` row.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from mlops.errors import CheckFailed
from mlops.lake import INFERENCE_LOG as LOG_DIR
from mlops.registry import CHALLENGER, CHAMPION
from mlops.settings import Settings
from mlops.storage import Storage
from tasks.common import stage

OK, FAILED, SKIPPED = "ok", "failed", "skipped"


# ---------------------------------------------------------------- typed results


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str
    figure: str
    detail: str


@dataclass(frozen=True)
class MaintenanceReport:
    run_date: str
    checks: tuple[CheckResult, ...]

    @property
    def failed(self) -> tuple[CheckResult, ...]:
        return tuple(c for c in self.checks if c.status == FAILED)

    def markdown(self) -> str:
        lines = [
            f"# Daily maintenance {self.run_date}",
            "",
            "| check | status | figure | detail |",
            "|---|---|---|---|",
        ]
        for c in self.checks:
            detail = c.detail.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {c.name} | {c.status.upper()} | {c.figure} | {detail} |")
        return "\n".join(lines)

    def table(self) -> str:
        width = max((len(c.name) for c in self.checks), default=5)
        rows = [f"{'check':<{width}}  {'status':<7}  {'figure':<28}  detail"]
        for c in self.checks:
            rows.append(f"{c.name:<{width}}  {c.status.upper():<7}  {c.figure:<28}  {c.detail}")
        return "\n".join(rows)


class MaintenanceFailed(Exception):
    """At least one check failed; carries the whole report."""

    def __init__(self, message: str, report: MaintenanceReport) -> None:
        super().__init__(message)
        self.report = report

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.report))


@dataclass(frozen=True)
class ResourceMinimums:
    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: float = 1.0
    object_store_gb: float = 0.25


@dataclass(frozen=True)
class CleanupRules:
    """How old (days) each kind of leftover must be before it goes."""

    tmp_days: float = 1.0
    ray_session_days: float = 3.0
    tune_results_days: float = 14.0
    inference_log_days: float = 30.0


@dataclass(frozen=True)
class Candidate:
    path: str
    kind: str
    bytes: int
    age_days: float


@dataclass(frozen=True)
class CleanupPlan:
    doomed: tuple[Candidate, ...]
    protected: tuple[Candidate, ...]
    dry_run: bool

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.doomed)


@dataclass(frozen=True)
class FailedRun:
    flow: str
    message: str
    state: str
    start: str


@dataclass(frozen=True)
class ErrorGroup:
    flow: str
    first_line: str
    count: int
    last_seen: str


# ---------------------------------------------------------------- pure core


def outcome(name: str, state: Any) -> CheckResult:
    """A check's final Prefect state as a report row (a failure keeps its first line)."""
    result = state.result(raise_on_failure=False)
    if isinstance(result, CheckResult):
        return result
    text = str(result).strip().splitlines()
    first = text[0] if text else type(result).__name__
    return CheckResult(name, FAILED, "-", f"{type(result).__name__}: {first}")


def resource_shortfalls(resources: dict[str, float], minimums: ResourceMinimums) -> list[str]:
    gb = 1024**3
    have = {
        "CPU": resources.get("CPU", 0.0),
        "GPU": resources.get("GPU", 0.0),
        "memory_gb": resources.get("memory", 0.0) / gb,
        "object_store_gb": resources.get("object_store_memory", 0.0) / gb,
    }
    want = {
        "CPU": minimums.cpus,
        "GPU": minimums.gpus,
        "memory_gb": minimums.memory_gb,
        "object_store_gb": minimums.object_store_gb,
    }
    return [f"{k} {have[k]:.2f} < {want[k]:.2f}" for k in want if have[k] < want[k]]


def _norm(path: str) -> str:
    return path.removeprefix("file://").rstrip("/")


def is_protected(path: str, protected_paths: Iterable[str], markers: Iterable[str] = ()) -> bool:
    """A path that holds, or lies inside, something protected; or whose name carries a marker."""
    p = _norm(path)
    for q in map(_norm, protected_paths):
        if q and (p == q or q.startswith(p + "/") or p.startswith(q + "/")):
            return True
    base = posixpath.basename(p)
    return any(m and m in base for m in markers)


def plan_cleanup(
    candidates: Sequence[Candidate],
    rules: CleanupRules,
    protected_paths: Iterable[str],
    markers: Iterable[str] = (),
    dry_run: bool = True,
) -> CleanupPlan:
    """What goes: old enough for its kind, and never something protected."""
    limits = {
        "tmp": rules.tmp_days,
        "ray_session": rules.ray_session_days,
        "tune_results": rules.tune_results_days,
        "inference_logs": rules.inference_log_days,
    }
    protected_paths, markers = list(protected_paths), list(markers)
    doomed, kept = [], []
    for c in candidates:
        if c.age_days < limits.get(c.kind, float("inf")):
            continue
        if is_protected(c.path, protected_paths, markers):
            kept.append(c)
        else:
            doomed.append(c)
    return CleanupPlan(tuple(doomed), tuple(kept), dry_run)


def group_failures(runs: Sequence[FailedRun]) -> list[ErrorGroup]:
    """Failed or crashed runs grouped by flow and first error line, biggest group first."""
    groups: dict[tuple[str, str], list[FailedRun]] = {}
    for run in runs:
        lines = run.message.strip().splitlines()
        first = lines[0][:200] if lines else f"({run.state.lower()} without a message)"
        groups.setdefault((run.flow, first), []).append(run)
    out = [
        ErrorGroup(flow, first, len(rs), max(r.start for r in rs))
        for (flow, first), rs in groups.items()
    ]
    return sorted(out, key=lambda g: (-g.count, g.flow, g.first_line))


def utilization_trend(
    history: Sequence[dict[str, Any]], current: dict[str, Any], window: int = 7
) -> dict[str, float]:
    """Each metric now minus its mean over the previous ``window`` runs (other dates only)."""
    previous = [h for h in history if h.get("run_date") != current.get("run_date")][-window:]
    trend = {}
    for key, value in current.items():
        if key == "run_date" or not isinstance(value, int | float):
            continue
        past = [h[key] for h in previous if isinstance(h.get(key), int | float)]
        if past:
            trend[key] = round(value - sum(past) / len(past), 2)
    return trend


def merge_history(
    history: Sequence[dict[str, Any]], current: dict[str, Any], keep: int = 90
) -> list[dict[str, Any]]:
    """Re-running a day replaces its entry; the history stays in date order."""
    rest = [h for h in history if h.get("run_date") != current["run_date"]]
    return sorted([*rest, current], key=lambda h: str(h["run_date"]))[-keep:]


# ---------------------------------------------------------------- I/O helpers


def _tree(fs: Any, path: str) -> tuple[int, float]:
    """(bytes, newest modification as epoch seconds) of a file or directory."""
    infos = [fs.info(path)]  # the entry itself counts: an empty new directory is young
    if not fs.isfile(path):
        files = list(fs.find(path, detail=True).values())
        total = sum(int(i.get("size") or 0) for i in files)
        infos += files
    else:
        total = int(infos[0].get("size") or 0)
    newest = 0.0
    for i in infos:
        m = i.get("mtime") or i.get("LastModified") or i.get("created") or 0
        newest = max(newest, m.timestamp() if isinstance(m, datetime) else float(m))
    return total, newest


def _candidate(fs: Any, path: str, kind: str, now: datetime) -> Candidate:
    size, newest = _tree(fs, path)
    age = (now.timestamp() - newest) / 86400 if newest else float("inf")
    return Candidate(path, kind, size, round(age, 3))


def find_candidates(
    settings: Settings, ray_temp_dir: str, now: datetime, current_session: str | None = None
) -> list[Candidate]:
    """Leftovers: temp files, old Ray sessions, Tune results and inference logs."""
    data = Storage(settings.storage_root, settings.storage_options)
    out: list[Candidate] = []
    for rel, kind in (("features/_tmp", "tmp"), ("ray_results", "tune_results")):
        for name in data.ls_dirs(rel):
            out.append(_candidate(data.fs, data.path(rel, name), kind, now))
    for name in data.ls_dirs(LOG_DIR):
        day = name.removeprefix("date=")
        try:
            age = (now.date() - datetime.fromisoformat(day).date()).days
        except ValueError:
            continue
        size, _ = _tree(data.fs, data.path(LOG_DIR, name))
        out.append(Candidate(data.path(LOG_DIR, name), "inference_logs", size, age))
    local = Storage("/")
    for dirpath, _dirs, files in os.walk(settings.home):
        for f in files:
            if f.startswith((".tmp-", ".mlops-probe-")):
                out.append(_candidate(local.fs, os.path.join(dirpath, f), "tmp", now))
    ray_tmp = Path(ray_temp_dir)
    if ray_tmp.is_dir():
        live = {os.path.realpath(ray_tmp / "session_latest")}
        if current_session:
            live.add(os.path.realpath(current_session))
        for entry in sorted(ray_tmp.glob("session_*")):
            if entry.is_symlink() or os.path.realpath(entry) in live:
                continue
            out.append(_candidate(local.fs, str(entry), "ray_session", now))
    return out


def protected_locations(settings: Settings, backup_root: str) -> tuple[list[str], list[str]]:
    """Paths and name markers of the champion's and challenger's artifacts and of kept backups."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from tasks.backup import list_backups, open_root, read_manifest

    paths: list[str] = []
    markers: list[str] = []
    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    for alias in (CHAMPION, CHALLENGER):
        try:
            mv = client.get_model_version_by_alias(settings.model_name, alias)
        except MlflowException:
            continue
        paths += [p for p in (mv.source, getattr(mv, "storage_location", None)) if p]
        if mv.run_id:
            paths.append(client.get_run(mv.run_id).info.artifact_uri)
        paths += [v for k, v in mv.tags.items() if k.endswith("_uri")]
        if mv.tags.get("feature_snapshot_hash"):
            markers.append(f"hpo-{mv.tags['feature_snapshot_hash']}")
    try:
        root = open_root(backup_root, settings.storage_options, create=False)
    except Exception:
        return paths, markers
    for bid in list_backups(root):  # backups on disk are the ones retention kept
        paths += [f.source for f in read_manifest(root, bid).files if f.source]
    return paths, markers


def _delete(path: str) -> None:
    if path.startswith("s3://") or "://" in path:
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        fs.rm(p, recursive=True)
    elif os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def _gb(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


# ---------------------------------------------------------------- checks (Prefect tasks)


@stage("check_ray_resources")
def check_ray_resources(minimums: ResourceMinimums) -> CheckResult:
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


@stage("check_storage")
def check_storage(settings: Settings, roots: Sequence[str]) -> CheckResult:
    """Write, read back and delete a small object under each root."""
    timings = []
    for root in roots:
        storage = Storage(root, settings.storage_options)
        rel = posixpath.join("_maintenance", f"roundtrip-{uuid.uuid4().hex}")
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


@stage("check_mlflow")
def check_mlflow(settings: Settings) -> CheckResult:
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


@stage("check_serving")
def check_serving(settings: Settings, require_serve: bool) -> CheckResult:
    """The Serve application is RUNNING and answers a real prediction with the champion."""
    import httpx

    from tasks.backup import drill_requests

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


@stage("check_prefect_api")
def check_prefect_api(api_url: str) -> CheckResult:
    import httpx

    t0 = time.monotonic()
    resp = httpx.get(f"{api_url.rstrip('/')}/health", timeout=10)
    if resp.status_code != 200:
        raise CheckFailed(f"{api_url}/health answered HTTP {resp.status_code}")
    return CheckResult(
        "prefect_api", OK, f"{1000 * (time.monotonic() - t0):.0f} ms", f"{api_url} healthy"
    )


@stage("clean_up_state")
def clean_up_state(
    settings: Settings,
    backup_root: str,
    rules: CleanupRules,
    dry_run: bool,
    ray_temp_dir: str,
    now: datetime,
) -> CheckResult:
    """Remove old leftovers (or, in dry-run, list them); protected artifacts are never touched."""
    candidates = find_candidates(settings, ray_temp_dir, now, _current_session_dir())
    paths, markers = protected_locations(settings, backup_root)
    plan = plan_cleanup(candidates, rules, paths, markers, dry_run)
    if not dry_run:
        for c in plan.doomed:
            _delete(c.path)
    verb = "would remove" if dry_run else "removed"
    listed = ", ".join(f"{c.kind}:{posixpath.basename(c.path)}" for c in plan.doomed[:8])
    more = f" (+{len(plan.doomed) - 8} more)" if len(plan.doomed) > 8 else ""
    detail = (
        f"{verb} {len(plan.doomed)} items: {listed or 'nothing'}{more}; "
        f"{len(plan.protected)} old items kept as protected"
    )
    return CheckResult(
        "cleanup",
        OK,
        f"{len(plan.doomed)} items, {plan.bytes} bytes{' (dry-run)' * dry_run}",
        detail,
    )


def _current_session_dir() -> str | None:
    try:
        from ray._private.worker import global_worker

        return str(global_worker.node.get_session_dir_path())
    except Exception:
        return None


@stage("validate_backups")
def validate_backups(
    settings: Settings, backup_root: str, scratch: str | None, require_backup: bool
) -> CheckResult:
    """The restore drill on the latest backup into a scratch location."""
    import tempfile

    from mlops.errors import BackupError
    from tasks.backup import list_backups, open_root, restore_drill

    try:
        root = open_root(backup_root, settings.storage_options, create=False)
        ids = list_backups(root)
    except BackupError as exc:
        raise CheckFailed(str(exc)) from None
    if not ids:
        if require_backup:
            raise CheckFailed(f"no backup under {backup_root}")
        return CheckResult("validate_backups", SKIPPED, "no backups", f"none under {backup_root}")
    base = Path(scratch) if scratch else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mlops-drill-", dir=base))
    try:
        drill = restore_drill(
            root, ids[-1], work / "home", server_store=settings.mlflow_backend_store_uri
        )
    except BackupError as exc:
        raise CheckFailed(str(exc)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not drill.passed:
        raise CheckFailed(f"restore drill on {drill.backup_id} failed: {drill.detail}")
    return CheckResult("validate_backups", OK, f"drill on {drill.backup_id}", drill.detail)


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


@stage("report_utilization")
def report_utilization(settings: Settings, run_date: str, max_disk_percent: float) -> CheckResult:
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


@stage("review_errors")
def review_errors(now: datetime, hours: float, max_failed_runs: int) -> CheckResult:
    """Failed or crashed flow runs in the window, grouped by flow and first error line."""
    runs = read_failed_runs(now - timedelta(hours=hours), now)
    groups = group_failures(runs)
    detail = "; ".join(f"{g.flow} x{g.count}: {g.first_line}" for g in groups[:5]) or "none"
    if len(runs) > max_failed_runs:
        raise CheckFailed(
            f"{len(runs)} failed/crashed flow runs in {hours:g} h (max {max_failed_runs}): {detail}"
        )
    return CheckResult("error_log", OK, f"{len(runs)} failed runs / {hours:g} h", detail)


@stage("publish_report")
def publish_report(run_date: str, rows: Sequence[CheckResult]) -> MaintenanceReport:
    """One markdown artifact with a row per check."""
    from prefect.artifacts import create_markdown_artifact

    report = MaintenanceReport(run_date, tuple(rows))
    create_markdown_artifact(
        key="daily-maintenance",
        markdown=report.markdown(),
        description=f"daily maintenance {run_date}: {len(report.failed)} failed",
    )
    return report
