"""Daily maintenance: health checks, cleanup, the restore drill, utilization and error review."""

from __future__ import annotations

from prefect import flow
from prefect_ray.context import remote_options

from mlops.backups import timestamp_for
from mlops.settings import load_settings
from mlops.task_runner import MlopsRayTaskRunner, current_prefect_api_url
from tasks.backup.prefect_tasks import validate_backups
from tasks.maintenance.core import (
    CleanupRules,
    MaintenanceFailed,
    MaintenanceReport,
    ResourceMinimums,
    outcome,
)
from tasks.maintenance.prefect_tasks import (
    check_mlflow,
    check_prefect_api,
    check_ray_resources,
    check_serving,
    check_storage,
    clean_up_state,
    publish_report,
    report_utilization,
    review_errors,
)


@flow(name="daily-maintenance", task_runner=MlopsRayTaskRunner(), log_prints=False)
def daily_maintenance(
    run_date: str | None = None,
    backup_root: str | None = None,
    min_cpus: float = 1.0,
    min_gpus: float = 0.0,
    min_memory_gb: float = 1.0,
    min_object_store_gb: float = 0.25,
    require_serve: bool = False,
    require_backup: bool = True,
    cleanup_dry_run: bool = False,
    ray_temp_dir: str = "/tmp/ray",
    tmp_days: float = 1.0,
    ray_session_days: float = 3.0,
    tune_results_days: float = 14.0,
    inference_log_days: float = 30.0,
    drill_scratch: str | None = None,
    max_disk_percent: float = 90.0,
    error_window_hours: float = 24.0,
    max_failed_runs: int = 0,
) -> MaintenanceReport:
    """Run every check, publish one report artifact, and fail if any check failed."""
    settings = load_settings()
    now = timestamp_for(run_date)
    day = now.date().isoformat()
    root = backup_root or settings.backup_root
    rules = CleanupRules(tmp_days, ray_session_days, tune_results_days, inference_log_days)
    minimums = ResourceMinimums(min_cpus, min_gpus, min_memory_gb, min_object_store_gb)
    with remote_options(num_cpus=0):  # light, I/O-bound checks: never wait for a CPU
        checks = {
            "ray_resources": check_ray_resources.submit(minimums),
            "storage_roundtrip": check_storage.submit(settings, [settings.storage_root, root]),
            "mlflow_champion": check_mlflow.submit(settings),
            "serving": check_serving.submit(settings, require_serve),
            "prefect_api": check_prefect_api.submit(current_prefect_api_url() or ""),
            "cleanup": clean_up_state.submit(
                settings, root, rules, cleanup_dry_run, ray_temp_dir, now
            ),
            "validate_backups": validate_backups.submit(
                settings, root, drill_scratch, require_backup
            ),
            "utilization": report_utilization.submit(settings, day, max_disk_percent),
            "error_log": review_errors.submit(now, error_window_hours, max_failed_runs),
        }
        for fut in checks.values():
            fut.wait()
        rows = [outcome(name, fut.state) for name, fut in checks.items()]
        report = publish_report.submit(day, rows).result()
    if report.failed:
        names = ", ".join(c.name for c in report.failed)
        raise MaintenanceFailed(f"{len(report.failed)} check(s) failed: {names}", report)
    return report
