"""The drift event: one shape for every sender, so one deployment trigger starts retraining.

The hourly drift flow and the webhook receiver both emit ``mlops.drift.detected`` about the
resource ``mlops.model.<model name>``. The training deployment's trigger in ``prefect.yaml``
matches that event and takes the run's parameters from its payload (``retrain_start``,
``retrain_end``, and the event id as ``triggered_by``).

Events are sent with ``POST /api/events``, which answers only once the server has taken them,
so a sender knows the event reached Prefect (the websocket client sends in the background).
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any

DRIFT_EVENT = "mlops.drift.detected"
RESOURCE_PREFIX = "mlops.model."
# Retraining after drift uses the trailing window that ends where the drifted data ends.
DEFAULT_RETRAIN_DAYS = 365


def model_resource_id(model_name: str) -> str:
    return f"{RESOURCE_PREFIX}{model_name}"


def retrain_window(window_end: dt.date, days: int = DEFAULT_RETRAIN_DAYS) -> tuple[str, str]:
    """The inclusive training window of ``days`` days that ends on ``window_end``."""
    start = window_end - dt.timedelta(days=max(1, days) - 1)
    return start.isoformat(), window_end.isoformat()


@dataclass(frozen=True)
class DriftAlert:
    """What a drift detection says: which model, which data, how far it moved, and by whom."""

    model_name: str
    window_start: dt.date
    window_end: dt.date
    source: str  # "drift-check" or "webhook:<sender>"
    champion_version: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    alert_id: str | None = None
    retrain_days: int = DEFAULT_RETRAIN_DAYS

    def payload(self) -> dict[str, Any]:
        retrain_start, retrain_end = retrain_window(self.window_end, self.retrain_days)
        return {
            "model": self.model_name,
            "champion_version": self.champion_version,
            "window_start": self.window_start.isoformat(),
            "window_end": self.window_end.isoformat(),
            "scores": {k: float(v) for k, v in self.scores.items()},
            "reason": self.reason,
            "source": self.source,
            "alert_id": self.alert_id,
            "retrain_start": retrain_start,
            "retrain_end": retrain_end,
        }

    def resource(self) -> dict[str, str]:
        resource = {
            "prefect.resource.id": model_resource_id(self.model_name),
            "prefect.resource.name": self.model_name,
        }
        if self.champion_version:
            resource["mlops.model.version"] = str(self.champion_version)
        return resource

    def event(self, event_id: uuid.UUID | None = None) -> dict[str, Any]:
        """The event as the Prefect events API takes it."""
        return {
            "id": str(event_id or uuid.uuid4()),
            "occurred": dt.datetime.now(dt.UTC).isoformat(),
            "event": DRIFT_EVENT,
            "resource": self.resource(),
            "related": [],
            "payload": self.payload(),
        }


def post_events(events: list[dict[str, Any]]) -> None:
    """Send events to the Prefect API named by ``PREFECT_API_URL``; raise if it refuses them."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        response = client._client.post("/events", json=events)  # its auth and base URL
        response.raise_for_status()


def emit_drift(alert: DriftAlert, event_id: uuid.UUID | None = None) -> str:
    """Emit ``mlops.drift.detected`` for ``alert`` and return the event id."""
    event = alert.event(event_id)
    post_events([event])
    return str(event["id"])
