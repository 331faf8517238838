"""Prefect wrappers of the maintenance checks: each calls one plain function and returns its row."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from mlops.results import CheckResult
from mlops.settings import Settings
from tasks.common import stage
from tasks.maintenance import checks
from tasks.maintenance.cleanup import clean_up
from tasks.maintenance.core import CleanupRules, MaintenanceReport, ResourceMinimums


@stage("check_ray_resources")
def check_ray_resources(minimums: ResourceMinimums) -> CheckResult:
    return checks.ray_resources(minimums)


@stage("check_storage")
def check_storage(settings: Settings, roots: Sequence[str]) -> CheckResult:
    """Write, read back and delete a small object under each root."""
    return checks.storage_roundtrip(settings, roots)


@stage("check_mlflow")
def check_mlflow(settings: Settings) -> CheckResult:
    return checks.mlflow_champion(settings)


@stage("check_serving")
def check_serving(settings: Settings, require_serve: bool) -> CheckResult:
    """The Serve application is RUNNING and answers a real prediction with the champion."""
    return checks.serving(settings, require_serve)


@stage("check_prefect_api")
def check_prefect_api(api_url: str) -> CheckResult:
    return checks.prefect_api(api_url)


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
    return clean_up(settings, backup_root, rules, dry_run, ray_temp_dir, now)


@stage("report_utilization")
def report_utilization(settings: Settings, run_date: str, max_disk_percent: float) -> CheckResult:
    """CPU, GPU, memory and disk now, and the change against the mean of previous runs."""
    return checks.utilization(settings, run_date, max_disk_percent)


@stage("review_errors")
def review_errors(now: datetime, hours: float, max_failed_runs: int) -> CheckResult:
    """Failed or crashed flow runs in the window, grouped by flow and first error line."""
    return checks.error_review(now, hours, max_failed_runs)


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
