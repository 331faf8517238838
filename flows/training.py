"""The training pipeline: ingest -> validate -> transform -> tune -> register -> gate -> promote."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run
from prefect_ray.context import remote_options

from mlops.results import PipelineSummary
from mlops.settings import load_settings
from mlops.sources import BUNDLED_SOURCE
from mlops.task_runner import MlopsRayTaskRunner
from tasks.gate import GatePolicy, evaluate_challenger
from tasks.ingest import ingest_partitions
from tasks.promote import promote_model, start_serving
from tasks.register import register_model
from tasks.transform import TransformConfig, build_feature_set
from tasks.tune import TuneBudget, tune_hyperparameters
from tasks.validate import ValidationConfig, validate_partitions


@flow(name="training-pipeline", task_runner=MlopsRayTaskRunner(), log_prints=False)
def training_pipeline(
    start: str = "2013-01-01",
    end: str = "2013-12-31",
    source: str = BUNDLED_SOURCE,
    trials: int = 8,
    max_concurrent_trials: int = 2,
    time_limit_s: float | None = None,
    max_rounds: int = 300,
    max_quarantine_share: float = 0.05,
    min_rows_per_partition: int = 100,
    promotion_margin: float = 0.0,
    promotion_strategy: str = "blue_green",
    canary_share: float = 0.1,
    refresh_cache: bool = False,
    triggered_by: str = "manual",
) -> PipelineSummary:
    """Train, validate, register and (if it wins the gate) serve a flight-delay model."""
    settings = load_settings()
    cached = {"refresh_cache": True} if refresh_cache else {}
    with remote_options(num_cpus=0):
        serve_up = start_serving.submit(settings)  # overlaps Serve's start-up with training

    ingest = ingest_partitions.with_options(**cached).submit(settings, source, start, end)
    report = validate_partitions.with_options(**cached).submit(
        settings,
        ingest,
        ValidationConfig(
            max_quarantine_share=max_quarantine_share,
            min_rows_per_partition=min_rows_per_partition,
        ),
    )
    # Stages that fan out on Ray Data / Ray Tune hold no CPU themselves.
    with remote_options(num_cpus=0):
        features = build_feature_set.with_options(**cached).submit(
            settings, report, TransformConfig()
        )
        tuned = tune_hyperparameters.with_options(**cached).submit(
            settings,
            features,
            TuneBudget(
                num_samples=trials,
                max_concurrent=max_concurrent_trials,
                time_limit_s=time_limit_s,
                max_rounds=max_rounds,
                gpus_per_trial=settings.tune_gpus_per_trial,
            ),
        )
    model = register_model.with_options(**cached).submit(
        settings, tuned, features, report, flow_run.get_id(), triggered_by
    )
    decision = evaluate_challenger.submit(
        settings, model, features, GatePolicy(margin=promotion_margin)
    )
    with remote_options(num_cpus=0):
        serving = promote_model.submit(
            settings,
            decision,
            model,
            features,
            promotion_strategy,
            canary_share,
            wait_for=[serve_up],
        )

    return PipelineSummary(
        ingest=ingest.result(),
        validation=report.result(),
        features=features.result(),
        tune=tuned.result(),
        model=model.result(),
        decision=decision.result(),
        serving=serving.result(),
        flow_run_id=flow_run.get_id(),
    )
