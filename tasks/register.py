"""Register: log the best booster with a signature and input example, register it with lineage.

The new version gets the ``challenger`` alias. Registration is idempotent: a version already
registered for the same search (tag ``hpo_parent_run_id``) is reused, never duplicated.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from mlops.registry import CHALLENGER, Lineage, ModelRegistry
from mlops.results import FeatureSet, RegisteredModel, TuneResult, ValidationReport
from mlops.settings import Settings
from mlops.storage import Storage
from tasks.common import stage


def lineage_for(
    features: FeatureSet,
    validation: ValidationReport,
    tune: TuneResult,
    flow_run_id: str | None,
    code: str,
    trigger: str = "manual",
) -> Lineage:
    return Lineage(
        data_window=f"{validation.start}..{validation.end}",
        feature_snapshot_hash=features.snapshot_hash,
        features_uri=features.uri,
        validation_verdict=validation.verdict,
        prefect_flow_run_id=flow_run_id or "none",
        code_version=code,
        hpo_parent_run_id=tune.parent_run_id,
        best_params=json.dumps(tune.best_params, sort_keys=True, default=str),
        best_valid_auc=round(tune.best_metric, 6),
        trigger=trigger,
    )


def load_checkpoint_booster(storage: Storage, path: str) -> Any:
    import xgboost as xgb

    booster = xgb.Booster()
    booster.load_model(bytearray(storage.fs.cat_file(path)))
    return booster


def register(
    settings: Settings,
    tune: TuneResult,
    features: FeatureSet,
    lineage: Lineage,
) -> RegisteredModel:
    import mlflow
    import mlflow.xgboost
    import xgboost as xgb
    from mlflow.models import infer_signature

    from mlops.lake import read_split

    registry = ModelRegistry(settings)
    existing = registry.find_version_by_tag("hpo_parent_run_id", tune.parent_run_id)
    if existing is not None:
        registry.set_alias(CHALLENGER, existing)
        return RegisteredModel(
            settings.model_name, existing, tune.parent_run_id, registry.model_uri(existing)
        )

    storage = Storage(settings.storage_root, settings.storage_options)
    booster = load_checkpoint_booster(storage, tune.best_checkpoint)
    booster.set_param({"device": "cpu", "nthread": 1})  # the registered model serves anywhere
    example = read_split(storage, features, "test").loc[:, list(features.feature_columns)].head(5)
    signature = infer_signature(example, booster.predict(xgb.DMatrix(example)))

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)

    mlflow.set_registry_uri(settings.mlflow_tracking_uri)  # not the process default
    with mlflow.start_run(run_id=tune.parent_run_id, experiment_id=tune.experiment_id):
        mlflow.log_params({f"best_{k}": v for k, v in tune.best_params.items()})
        mlflow.log_metric(f"best_{tune.metric_name}", tune.best_metric)
        mlflow.set_tags(lineage.tags())
        info = mlflow.xgboost.log_model(
            booster,
            name="model",
            signature=signature,
            input_example=example,
            registered_model_name=settings.model_name,
            model_format="ubj",
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "lineage.json")
            with open(path, "w") as f:
                json.dump(lineage.tags(), f, indent=2)
            mlflow.log_artifact(path)
    version = str(info.registered_model_version)
    registry.tag_version(version, lineage.tags())
    registry.set_alias(CHALLENGER, version)
    return RegisteredModel(
        settings.model_name, version, tune.parent_run_id, registry.model_uri(version)
    )


@stage(
    "register_model",
    cache_on=lambda p: (
        p["settings"].mlflow_tracking_uri,
        p["settings"].model_name,
        p["tune"].parent_run_id,
    ),
)
def register_model(
    settings: Settings,
    tune: TuneResult,
    features: FeatureSet,
    validation: ValidationReport,
    flow_run_id: str | None,
    trigger: str = "manual",
) -> RegisteredModel:
    """Prefect wrapper: register the search's best model as the new ``challenger``."""
    from prefect import get_run_logger

    from mlops.fingerprint import code_version

    lineage = lineage_for(features, validation, tune, flow_run_id, code_version(), trigger)
    model = register(settings, tune, features, lineage)
    get_run_logger().info("registered %s version %s as %s", model.name, model.version, CHALLENGER)
    return model
