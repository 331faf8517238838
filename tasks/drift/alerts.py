"""Drift alerts: the cooldown decision (pure), its record under the storage root, and the event.

One ``mlops.drift.detected`` event per champion version per cooldown; the record is written only
after the server accepted the event.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from mlops import lake
from mlops.errors import UserError
from mlops.events import DEFAULT_RETRAIN_DAYS
from mlops.results import (
    AlertOutcome,
    ChampionReference,
    DriftCheck,
    DriftReport,
)
from mlops.settings import Settings
from mlops.storage import Storage


@dataclass(frozen=True)
class AlertRecord:
    """The last drift event sent for a model: kept under the storage root for the cooldown."""

    model_name: str
    champion_version: str
    event_id: str
    emitted_at: str  # ISO 8601, UTC
    window_start: str
    window_end: str


@dataclass(frozen=True)
class AlertPolicy:
    """When a drift verdict becomes an event, and what retraining window the event asks for."""

    cooldown_hours: float = 24.0
    retrain_days: int = DEFAULT_RETRAIN_DAYS
    emit: bool = True

    def __post_init__(self) -> None:
        if not self.cooldown_hours >= 0:
            raise UserError(f"cooldown_hours must be >= 0, got {self.cooldown_hours!r}")
        if self.retrain_days < 1:
            raise UserError(f"retrain_days must be >= 1, got {self.retrain_days!r}")


@dataclass(frozen=True)
class AlertDecision:
    action: str  # "emit", "suppress", "disabled" or "none"
    reason: str


def decide_alert(
    report: DriftReport,
    champion_version: str,
    last: AlertRecord | None,
    now: dt.datetime,
    policy: AlertPolicy,
) -> AlertDecision:
    """Emit on drift unless an alert for the same champion version went out within the cooldown.

    A new champion version always gets its own first alert.
    """
    cooldown_hours = policy.cooldown_hours
    if not report.drift_detected:
        return AlertDecision("none", f"no alert: verdict is {report.verdict}")
    if last is not None and last.champion_version == champion_version:
        sent = dt.datetime.fromisoformat(last.emitted_at)
        age_h = (now - sent).total_seconds() / 3600
        if age_h < cooldown_hours:
            until = (sent + dt.timedelta(hours=cooldown_hours)).isoformat(timespec="seconds")
            return AlertDecision(
                "suppress",
                f"suppressed: event {last.event_id} already reported drift for champion version "
                f"{champion_version} {age_h:.2f} h ago (window {last.window_start}.."
                f"{last.window_end}); cooldown is {cooldown_hours:g} h, until {until}",
            )
        why = f"the {cooldown_hours:g} h cooldown since event {last.event_id} has passed"
    elif last is not None:
        why = f"the champion changed from version {last.champion_version} to {champion_version}"
    else:
        why = f"first drift alert for champion version {champion_version}"
    if not policy.emit:
        return AlertDecision("disabled", f"not sent: emit is off (it would have been: {why})")
    return AlertDecision("emit", f"emitted: {why}")


def read_last_alert(storage: Storage, model_name: str) -> AlertRecord | None:
    rel = lake.drift_alert_path(model_name)
    if not storage.exists(rel):
        return None
    return AlertRecord(**storage.read_json(rel))


def write_last_alert(storage: Storage, record: AlertRecord) -> None:
    """Replace the cooldown record atomically (Storage writes aside and renames)."""
    storage.write_json(lake.drift_alert_path(record.model_name), record.__dict__)


def event_id_for(flow_run_id: str | None, champion: ChampionReference) -> uuid.UUID:
    """Stable per flow run: a retried emit resends the same event, which the server drops."""
    if not flow_run_id:
        return uuid.uuid4()
    return uuid.uuid5(uuid.NAMESPACE_URL, f"mlops.drift/{flow_run_id}/{champion.version}")


def send_alert(
    settings: Settings,
    check: DriftCheck,
    policy: AlertPolicy,
    flow_run_id: str | None,
    logger: Any,
) -> AlertOutcome:
    """Send ``mlops.drift.detected`` unless the cooldown holds it back; record what was sent.

    The cooldown record is written only after the server accepted the event.
    """
    from mlops.events import DriftAlert, emit_drift

    storage = Storage(settings.storage_root, settings.storage_options)
    champion = check.champion
    try:
        last = read_last_alert(storage, champion.model_name)
    except (ValueError, TypeError) as exc:  # a damaged record must not silence alerts forever
        logger.warning("cooldown record unreadable, treated as absent: %s", exc)
        last = None
    now = dt.datetime.now(dt.UTC)
    decision = decide_alert(check.report, champion.version, last, now, policy)
    if decision.action != "emit":
        action = {"suppress": "suppressed"}.get(decision.action, decision.action)
        logger.info("drift alert %s: %s", action, decision.reason)
        return AlertOutcome(action, decision.reason)
    assert check.window_start is not None and check.window_end is not None
    alert = DriftAlert(
        model_name=champion.model_name,
        window_start=dt.date.fromisoformat(check.window_start),
        window_end=dt.date.fromisoformat(check.window_end),
        source="drift-check",
        champion_version=champion.version,
        scores=check.report.scores(),
        reason=check.report.reason,
        alert_id=flow_run_id,
        retrain_days=policy.retrain_days,
    )
    event_id = emit_drift(alert, event_id_for(flow_run_id, champion))
    write_last_alert(
        storage,
        AlertRecord(
            model_name=champion.model_name,
            champion_version=champion.version,
            event_id=event_id,
            emitted_at=now.isoformat(),
            window_start=check.window_start,
            window_end=check.window_end,
        ),
    )
    logger.warning("drift alert emitted (event %s): %s", event_id, check.report.reason)
    return AlertOutcome("emitted", decision.reason, event_id)
