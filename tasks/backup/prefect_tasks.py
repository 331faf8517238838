"""Prefect wrappers of the backup stage: each calls one core function and logs what it did."""

from __future__ import annotations

from datetime import datetime

from mlops.backups import (
    BackupResult,
    PruneResult,
    RetentionPolicy,
    manifest_rel,
    open_root,
    sha256_bytes,
)
from mlops.errors import CheckFailed
from mlops.results import CheckResult
from mlops.settings import Settings
from tasks.backup.drill import drill_latest
from tasks.backup.restore import verify_backup
from tasks.backup.take import prune, take_backup, write_dr_pointer
from tasks.common import stage


@stage("backup_state")
def backup_state(
    settings: Settings, backup_root: str, timestamp: datetime, include_datasets: bool = True
) -> BackupResult:
    """Prefect wrapper: take the snapshot (idempotent for the same timestamp)."""
    from prefect import get_run_logger

    result = take_backup(settings, backup_root, timestamp, include_datasets=include_datasets)
    get_run_logger().info(
        "backup %s: %d files, %d bytes; %d new files (%d bytes) stored in %.1fs",
        result.backup_id,
        result.files,
        result.total_bytes,
        result.new_files,
        result.new_bytes,
        result.seconds,
    )
    return result


@stage("verify_backup")
def verify_stored_backup(settings: Settings, backup_root: str, backup_id: str) -> str:
    """Prefect wrapper: re-read every blob; returns the manifest's own sha256."""
    root = open_root(backup_root, settings.storage_options, create=False)
    verify_backup(root, backup_id)
    return sha256_bytes(root.read_bytes(manifest_rel(backup_id)))


@stage("publish_dr_pointer")
def publish_dr_pointer(
    settings: Settings, dr_root: str, result: BackupResult, manifest_sha: str
) -> str:
    return write_dr_pointer(dr_root, settings.storage_options, result, manifest_sha)


@stage("prune_backups")
def prune_backups(settings: Settings, backup_root: str, policy: RetentionPolicy) -> PruneResult:
    from prefect import get_run_logger

    result = prune(open_root(backup_root, settings.storage_options, create=False), policy)
    get_run_logger().info(
        "kept %d backups, removed %d and %d unreferenced blobs (%d bytes)",
        len(result.kept),
        len(result.removed),
        result.removed_blobs,
        result.removed_bytes,
    )
    return result


@stage("validate_backups")
def validate_backups(
    settings: Settings, backup_root: str, scratch: str | None, require_backup: bool
) -> CheckResult:
    """Prefect wrapper: the restore drill on the latest backup (a daily maintenance check)."""
    from mlops.errors import BackupError

    try:
        root = open_root(backup_root, settings.storage_options, create=False)
    except BackupError as exc:
        raise CheckFailed(str(exc)) from None
    return drill_latest(
        root, backup_root, scratch, require_backup, settings.mlflow_backend_store_uri
    )
