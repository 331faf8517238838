"""Daily maintenance, the pure part: typed results and the decisions (shortfalls, cleanup plan,
failure groups, utilization trend), tested directly."""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mlops.results import FAILED, CheckResult


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
