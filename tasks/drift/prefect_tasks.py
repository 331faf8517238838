"""Prefect wrappers of the drift stage: each calls one core function and logs what it found."""

from __future__ import annotations

from mlops.results import AlertOutcome, ChampionReference, DriftCheck
from mlops.settings import Settings
from tasks.common import stage
from tasks.drift.alerts import AlertPolicy, send_alert
from tasks.drift.data import champion_reference, run_check
from tasks.drift.report import REPORT_ARTIFACT_KEY, drift_markdown
from tasks.drift.stats import DriftPolicy


@stage("resolve_champion")
def resolve_champion(settings: Settings) -> ChampionReference:
    """Prefect wrapper: the champion version and where its training snapshot lives."""
    from prefect import get_run_logger

    champion = champion_reference(settings)
    get_run_logger().info(
        "champion %s version %s, trained on %s (%s)",
        champion.model_name,
        champion.version,
        champion.data_window,
        champion.features_uri,
    )
    return champion


@stage("check_drift")
def check_drift(
    settings: Settings,
    champion: ChampionReference,
    source: str,
    start: str | None,
    end: str | None,
    window_days: int,
    policy: DriftPolicy,
) -> DriftCheck:
    """Prefect wrapper: load the reference and the current window, and assess the drift."""
    from prefect import get_run_logger

    check = run_check(settings, champion, source, start, end, window_days, policy)
    get_run_logger().info(
        "drift check %s..%s: %s", check.window_start, check.window_end, check.report.reason
    )
    return check


@stage("emit_drift_alert")
def emit_drift_alert(
    settings: Settings,
    check: DriftCheck,
    policy: AlertPolicy,
    flow_run_id: str | None,
) -> AlertOutcome:
    """Prefect wrapper: send ``mlops.drift.detected`` unless the cooldown holds it back."""
    from prefect import get_run_logger

    return send_alert(settings, check, policy, flow_run_id, get_run_logger())


@stage("publish_drift_report")
def publish_drift_report(check: DriftCheck, alert: AlertOutcome, policy: DriftPolicy) -> str:
    """Prefect wrapper: the report as a markdown artifact; returns its key."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        key=REPORT_ARTIFACT_KEY,
        markdown=drift_markdown(check, alert, policy),
        description=f"drift check: {check.report.verdict}, alert {alert.action}",
    )
    return REPORT_ARTIFACT_KEY
