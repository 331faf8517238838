"""Cleanup: find old leftovers (temp files, Ray sessions, Tune results, inference logs) and remove
the ones no champion, challenger or kept backup still references."""

from __future__ import annotations

import os
import posixpath
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from mlops.lake import FEATURES_TMP, INFERENCE_LOG, TUNE_RESULTS
from mlops.registry import CHALLENGER, CHAMPION
from mlops.results import OK, CheckResult
from mlops.settings import Settings
from mlops.storage import Storage
from tasks.maintenance.core import Candidate, CleanupRules, plan_cleanup


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
    for rel, kind in ((FEATURES_TMP, "tmp"), (TUNE_RESULTS, "tune_results")):
        for name in data.ls_dirs(rel):
            out.append(_candidate(data.fs, data.path(rel, name), kind, now))
    for name in data.ls_dirs(INFERENCE_LOG):
        day = name.removeprefix("date=")
        try:
            age = (now.date() - datetime.fromisoformat(day).date()).days
        except ValueError:
            continue
        size, _ = _tree(data.fs, data.path(INFERENCE_LOG, name))
        out.append(Candidate(data.path(INFERENCE_LOG, name), "inference_logs", size, age))
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

    from mlops.backups import list_backups, open_root, read_manifest

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


def clean_up(
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
