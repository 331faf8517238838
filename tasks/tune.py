"""Tune: Ray Tune search (Optuna sampler, ASHA early stopping) over XGBoost hyperparameters.

Each trial declares its resources. On a cluster with GPUs a trial takes one and XGBoost trains on
CUDA; where the GPU resource exists but no device is visible (or there is no GPU at all) it trains
on CPU with no code change and says so. Every trial is logged to MLflow under one parent run.
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import tempfile
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from mlops.devices import choose_device, cuda_device_visible
from mlops.lake import TUNE_RESULTS
from mlops.registry import get_or_create_experiment
from mlops.results import FeatureSet, TuneResult
from mlops.settings import Settings
from mlops.storage import Storage
from serving.state import serving_gpu_reserve
from tasks.common import stage

METRIC = "valid_auc"
MODEL_FILE = "model.ubj"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneBudget:
    num_samples: int = 8
    max_concurrent: int = 2
    time_limit_s: float | None = None
    max_rounds: int = 300
    early_stopping_rounds: int = 20
    report_every: int = 10
    cpus_per_trial: int = 1
    use_gpu: bool = True
    gpus_per_trial: float = 1.0
    seed: int = 42


# The config key that says which accelerator a trial asks Ray for ("gpu" or "cpu").
ACCELERATOR = "accelerator"


def search_space() -> dict[str, Any]:
    from ray import tune

    return {
        "eta": tune.loguniform(0.03, 0.3),
        "max_depth": tune.randint(3, 11),
        "min_child_weight": tune.loguniform(1.0, 50.0),
        "subsample": tune.uniform(0.6, 1.0),
        "colsample_bytree": tune.uniform(0.5, 1.0),
        "lambda": tune.loguniform(0.01, 10.0),
    }


def xgb_params(config: dict[str, Any], device: str, nthread: int) -> dict[str, Any]:
    return {
        "objective": "binary:logistic",
        "eval_metric": "auc",
        "tree_method": "hist",
        "device": device,
        "nthread": nthread,
        "max_bin": 128,
        **config,
    }


# Per process: a trial actor that Tune reuses keeps the matrices it built for the next trial.
_MATRICES: dict[tuple[str, str], Any] = {}


def split_matrix(storage: Storage, features: FeatureSet, split: str) -> Any:
    """One split of the snapshot as an XGBoost DMatrix, read by the trial's own process.

    Only the latest snapshot's matrices are kept. The frame is dropped once the matrix is built,
    and Arrow's allocator hands its pages back: it kept about as much again as the matrix.
    """
    import pyarrow as pa
    import xgboost as xgb

    from mlops.lake import read_split

    key = (features.uri, split)
    if key not in _MATRICES:
        for stale in [k for k in _MATRICES if k[0] != features.uri]:
            del _MATRICES[stale]
        frame = read_split(storage, features, split)
        rows = len(frame)
        _MATRICES[key] = xgb.DMatrix(
            frame.loc[:, list(features.feature_columns)], label=frame["label"]
        )
        del frame
        pa.default_memory_pool().release_unused()
        log.info("read %s split: %d rows", split, rows)
    return _MATRICES[key]


def train_trial(
    config: dict[str, Any],
    *,
    storage: Storage,
    features: FeatureSet,
    budget: TuneBudget,
) -> None:
    """One trial: train with early stopping, report every few rounds, checkpoint the booster.

    The trial reads its train and valid splits from storage itself (once per trial process), so
    the process that launches the search never holds the training data.
    """
    import ray
    import xgboost as xgb
    from ray import tune

    config = {k: v for k, v in config.items() if k != ACCELERATOR}
    gpu_ids = ray.get_gpu_ids()
    where = {"node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": str(gpu_ids)}
    device, note = choose_device(gpu_ids, cuda_device_visible())
    if "falling back" in note:
        log.warning(note)
    else:
        log.info(note)
    dtrain = split_matrix(storage, features, "train")
    dvalid = split_matrix(storage, features, "valid")

    class Report(xgb.callback.TrainingCallback):
        def after_iteration(self, model: Any, epoch: int, evals_log: dict) -> bool:
            if (epoch + 1) % budget.report_every == 0:
                tune.report(
                    {
                        METRIC: float(evals_log["valid"]["auc"][-1]),
                        "rounds": epoch + 1,
                        "device": device,
                        **where,
                    }
                )
            return False

    booster = xgb.train(
        xgb_params(config, device, budget.cpus_per_trial),
        dtrain,
        num_boost_round=budget.max_rounds,
        evals=[(dvalid, "valid")],
        early_stopping_rounds=budget.early_stopping_rounds,
        callbacks=[Report()],
        verbose_eval=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        booster.save_model(os.path.join(tmp, MODEL_FILE))
        tune.report(
            {
                METRIC: float(booster.best_score),
                "rounds": int(booster.best_iteration) + 1,
                "device": device,
                "completed": 1,
                **where,
            },
            checkpoint=tune.Checkpoint.from_directory(tmp),
        )


def asha_bounds(budget: TuneBudget, grace_reports: int = 3) -> tuple[int, int]:
    """(max_t, grace_period) in reports: ASHA stops no trial before 3 reports, or before its
    last one when the budget allows fewer (ASHA refuses a grace period above max_t)."""
    max_t = budget.max_rounds // budget.report_every + 1
    return max_t, min(grace_reports, max_t)


def gpu_slots(budget: TuneBudget, cluster_gpus: float) -> int:
    """How many trials may hold a GPU at once: the cluster's GPUs over the per-trial share."""
    if not budget.use_gpu or budget.gpus_per_trial <= 0:
        return 0
    return int(cluster_gpus // budget.gpus_per_trial + 1e-9)


def pick_accelerator(trials_on_gpu: int, slots: int) -> str:
    """GPU first: a new trial takes a GPU while one is free, otherwise it runs on CPU."""
    return "gpu" if trials_on_gpu < slots else "cpu"


def trial_resources(config: dict[str, Any], budget: TuneBudget) -> Any:
    """What a trial asks Ray for; a GPU request makes Ray place it on a GPU node."""
    from ray.tune import PlacementGroupFactory

    bundle: dict[str, float] = {"CPU": float(budget.cpus_per_trial)}
    if config.get(ACCELERATOR) == "gpu":
        bundle["GPU"] = budget.gpus_per_trial
    return PlacementGroupFactory([bundle])


def accelerator_searcher(searcher: Any, slots: int) -> Any:
    """Wrap a Tune searcher so that each suggested config names its trial's accelerator.

    On a cluster with GPU workers, the first trials fill the GPU slots and the others run on
    the CPU nodes at the same time, instead of every trial queueing for the GPUs.
    """
    from ray.tune.search import Searcher

    class AcceleratorAssigner(Searcher):
        def __init__(self) -> None:
            super().__init__(metric=searcher.metric, mode=searcher.mode)
            self.searcher = searcher
            self.on_gpu: set[str] = set()

        def set_search_properties(
            self, metric: str | None, mode: str | None, config: dict, **spec: Any
        ) -> bool:
            self._metric, self._mode = metric, mode
            return self.searcher.set_search_properties(metric, mode, config, **spec)

        def suggest(self, trial_id: str) -> Any:
            config = self.searcher.suggest(trial_id)
            if not isinstance(config, dict):
                return config  # None (wait) or Searcher.FINISHED
            accelerator = pick_accelerator(len(self.on_gpu), slots)
            if accelerator == "gpu":
                self.on_gpu.add(trial_id)
            return {**config, ACCELERATOR: accelerator}

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            self.searcher.on_trial_result(trial_id, result)

        def on_trial_complete(
            self, trial_id: str, result: dict | None = None, error: bool = False
        ) -> None:
            self.on_gpu.discard(trial_id)
            self.searcher.on_trial_complete(trial_id, result=result, error=error)

        # Tune checkpoints the searcher chain: this wrapper's own state, the inner one's file.
        def get_state(self) -> dict:
            return {"on_gpu": sorted(self.on_gpu)}

        def set_state(self, state: dict) -> None:
            self.on_gpu = set(state.get("on_gpu", ()))

        def save(self, checkpoint_path: str) -> None:
            self.searcher.save(checkpoint_path)

        def restore(self, checkpoint_path: str) -> None:
            self.searcher.restore(checkpoint_path)

    return AcceleratorAssigner()


def run_search(
    storage: Storage, features: FeatureSet, budget: TuneBudget, reserved_gpus: float = 0.0
) -> tuple[Any, int]:
    """Run the Tune experiment; returns (ResultGrid, trials that may hold a GPU at once)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    # GPUs the serving application may hold are not counted on: a trial waiting for one would
    # wait for ever.
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    slots = gpu_slots(budget, cluster_gpus - reserved_gpus if cluster_gpus else 0)
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, storage=storage, features=features, budget=budget),
        functools.partial(trial_resources, budget=budget),
    )
    max_t, grace = asha_bounds(budget)
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            search_alg=accelerator_searcher(OptunaSearch(seed=budget.seed), slots),
            scheduler=ASHAScheduler(max_t=max_t, grace_period=grace, reduction_factor=3),
            num_samples=budget.num_samples,
            max_concurrent_trials=budget.max_concurrent,
            time_budget_s=budget.time_limit_s,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"hpo-{features.snapshot_hash}-{uuid.uuid4().hex[:6]}",
            storage_path=storage.path(TUNE_RESULTS),
            storage_filesystem=storage.pyarrow_fs(),
            verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )
    return tuner.fit(), slots


def log_trials_to_mlflow(
    grid: Any, settings: Settings, features: FeatureSet, budget: TuneBudget, gpu_slots: int
) -> tuple[str, str]:
    """One parent run for the search, one child run per trial with its params and metric curve."""
    import time

    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    exp_id = get_or_create_experiment(client, settings)
    parent = client.create_run(
        exp_id,
        run_name=f"hpo-{features.snapshot_hash}",
        tags={"stage": "hpo", "feature_snapshot_hash": features.snapshot_hash},
    )
    pid = parent.info.run_id
    client.log_batch(
        pid,
        params=[Param(k, str(v)) for k, v in asdict(budget).items()]
        + [Param("gpu_trial_slots", str(gpu_slots)), Param("features_uri", features.uri)],
    )
    now = int(time.time() * 1000)
    for i, result in enumerate(grid):
        child = client.create_run(
            exp_id,
            run_name=f"trial-{i:03d}",
            tags={"mlflow.parentRunId": pid, "stage": "hpo-trial"},
        )
        cid = child.info.run_id
        final = result.metrics or {}
        metrics = [
            Metric(METRIC, float(value), now, int(step)) for step, value in metric_curve(result)
        ]
        tags = [
            RunTag("device", str(final.get("device", "unknown"))),
            RunTag("accelerator", str((result.config or {}).get(ACCELERATOR, "cpu"))),
            RunTag("node_id", str(final.get("node_id", "unknown"))),
            RunTag("gpu_ids", str(final.get("gpu_ids", "[]"))),
            RunTag("stopped_early", str(not final.get("completed"))),
        ]
        if result.error:
            tags.append(RunTag("error", str(result.error).splitlines()[0][:500]))
        client.log_batch(
            cid,
            params=[Param(k, str(v)) for k, v in (result.config or {}).items() if k != ACCELERATOR],
            metrics=metrics,
            tags=tags,
        )
        client.set_terminated(cid, "FAILED" if result.error else "FINISHED")
    client.set_terminated(pid, "FINISHED")
    return pid, exp_id


def metric_curve(result: Any) -> list[tuple[int, float]]:
    """(boosting round, metric) pairs a trial reported.

    A trial stopped by ASHA may have no progress file in its directory; its last reported
    result is then the curve's only point.
    """
    df = result.metrics_dataframe
    if df is not None and METRIC in df and "rounds" in df:
        rows = df.dropna(subset=[METRIC])
        return [(int(r), float(v)) for r, v in zip(rows["rounds"], rows[METRIC], strict=True)]
    final = result.metrics or {}
    if METRIC in final:
        return [(int(final.get("rounds", 0)), float(final[METRIC]))]
    return []


def pick_best(grid: Any) -> Any:
    """Best completed trial (ASHA-stopped trials have no final checkpoint)."""
    done = [r for r in grid if r.checkpoint is not None and not r.error and r.metrics]
    if not done:
        errors = [str(r.error).splitlines()[0] for r in grid if r.error]
        raise RuntimeError(f"no trial completed; first errors: {errors[:3]}")
    return max(done, key=lambda r: r.metrics[METRIC])


def tune_model(settings: Settings, features: FeatureSet, budget: TuneBudget) -> TuneResult:
    storage = Storage(settings.storage_root, settings.storage_options)
    reserve = serving_gpu_reserve(settings.serve_gpus_per_replica)
    grid, slots = run_search(storage, features, budget, reserve)
    pid, exp_id = log_trials_to_mlflow(grid, settings, features, budget, slots)
    best = pick_best(grid)
    return TuneResult(
        best_params={k: v for k, v in best.config.items() if k != ACCELERATOR},
        best_metric=float(best.metrics[METRIC]),
        metric_name=METRIC,
        trial_count=len(grid),
        completed_trials=sum(1 for r in grid if (r.metrics or {}).get("completed")),
        best_checkpoint=posixpath.join(best.checkpoint.path, MODEL_FILE),
        parent_run_id=pid,
        experiment_id=exp_id,
        device=str(best.metrics.get("device", "cpu")),
    )


@stage(
    "tune_hyperparameters",
    cache_on=lambda p: (
        p["settings"].storage_root,
        p["settings"].mlflow_tracking_uri,
        p["features"].snapshot_hash,
        p["budget"],
    ),
)
def tune_hyperparameters(
    settings: Settings, features: FeatureSet, budget: TuneBudget
) -> TuneResult:
    """Prefect wrapper: run the search; the task itself holds no CPU (its trials do)."""
    from prefect import get_run_logger

    result = tune_model(settings, features, budget)
    get_run_logger().info(
        "tuned %d trials (%d completed) on %s: best %s=%.4f params=%s",
        result.trial_count,
        result.completed_trials,
        result.device,
        result.metric_name,
        result.best_metric,
        result.best_params,
    )
    return result
