"""The backup flow: snapshot, verify, publish the DR pointer, prune (restore is `mlops restore`)."""

from __future__ import annotations

from prefect import flow

from mlops.backups import BackupResult, RetentionPolicy, timestamp_for
from mlops.settings import load_settings
from mlops.task_runner import MlopsRayTaskRunner
from tasks.backup.prefect_tasks import (
    backup_state,
    prune_backups,
    publish_dr_pointer,
    verify_stored_backup,
)


@flow(name="backup", task_runner=MlopsRayTaskRunner(), log_prints=False)
def backup(
    run_date: str | None = None,
    backup_root: str | None = None,
    dr_root: str | None = None,
    keep_daily: int = 7,
    keep_weekly: int = 4,
    include_datasets: bool = True,
) -> BackupResult:
    """Back up the serving state; ``run_date`` (date or ISO timestamp) names the snapshot."""
    settings = load_settings()
    root = backup_root or settings.backup_root
    taken = backup_state.submit(settings, root, timestamp_for(run_date), include_datasets)
    result = taken.result()
    manifest_sha = verify_stored_backup.submit(settings, root, result.backup_id)
    pointer = publish_dr_pointer.submit(
        settings, dr_root or settings.dr_pointer_root, result, manifest_sha
    )
    pruned = prune_backups.submit(
        settings, root, RetentionPolicy(daily=keep_daily, weekly=keep_weekly), wait_for=[pointer]
    )
    pruned.result()
    return result
