"""The model registry behind a small interface: MLflow aliases, never the deprecated stages.

A version's lineage (where its data came from, which search produced it, what started the run) is
written and read through one typed object, ``Lineage``. The champion and its booster are loaded by
one function, ``load_champion``, which serving, backup drills, drift checks and the gate share.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

from mlops.settings import Settings

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous-champion"


@dataclass(frozen=True)
class Lineage:
    """What a registered version was trained on and how: written as tags on the version and run."""

    data_window: str = "unknown"
    feature_snapshot_hash: str = ""
    features_uri: str = ""
    validation_verdict: str = ""
    prefect_flow_run_id: str = "none"
    code_version: str = ""
    hpo_parent_run_id: str = ""
    best_params: str = ""
    best_valid_auc: float = float("nan")
    trigger: str = "manual"  # what started the run: "manual", "schedule", "drift:<event id>"

    def tags(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Lineage:
        """Read back from tags; missing or empty tags keep their defaults."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = tags.get(f.name)
            if not raw:
                continue
            if f.name == "best_valid_auc":
                try:
                    values[f.name] = float(raw)
                except ValueError:
                    continue
            else:
                values[f.name] = raw
        return cls(**values)

    @property
    def dims_rel(self) -> str | None:
        """The lookups published with the training snapshot, relative to the storage root."""
        from mlops.lake import dims_for_features

        return dims_for_features(self.features_uri) if self.features_uri else None


@dataclass(frozen=True)
class VersionInfo:
    """One registered version: its number, the MLflow run that logged it, and its lineage."""

    tracking_uri: str
    model_name: str
    version: str
    run_id: str
    lineage: Lineage


@dataclass(frozen=True)
class Champion(VersionInfo):
    """The version behind the ``champion`` alias; its booster is loaded on first use."""

    @cached_property
    def booster(self) -> Any:
        return load_booster(self.tracking_uri, self.model_name, self.version)


def load_booster(tracking_uri: str, model_name: str, version: str) -> Any:
    """A registered version's XGBoost booster, from this registry (not the process default)."""
    import mlflow
    import mlflow.xgboost

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)  # not the process default
    return mlflow.xgboost.load_model(f"models:/{model_name}/{version}")


def version_info(client: Any, tracking_uri: str, model_name: str, version: str) -> VersionInfo:
    """A version and its lineage: the version's own tags first, then its run's.

    A version re-registered from the same run (e.g. by a restore) carries no tags of its own.
    """
    mv = client.get_model_version(model_name, version)
    tags = dict(mv.tags)
    if not tags.get("features_uri") and mv.run_id:
        try:
            tags = {**client.get_run(mv.run_id).data.tags, **tags}
        except Exception:  # the run is gone (a registry restored without its runs)
            pass
    return VersionInfo(
        tracking_uri, model_name, str(mv.version), str(mv.run_id or ""), Lineage.from_tags(tags)
    )


def load_champion(tracking_uri: str, model_name: str) -> Champion | None:
    """The champion of ``model_name`` in the registry at ``tracking_uri``, or None when unset."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        version = str(client.get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException:
        return None
    info = version_info(client, tracking_uri, model_name, version)
    return Champion(**info.__dict__)


def get_or_create_experiment(client: Any, settings: Settings) -> str:
    """The experiment id; new experiments keep artifacts under the configured root.

    Against an MLflow server the server decides where artifacts go (``--artifacts-destination``).
    """
    exp = client.get_experiment_by_name(settings.experiment_name)
    if exp is not None:
        return str(exp.experiment_id)
    remote = settings.mlflow_tracking_uri.startswith(("http://", "https://", "databricks"))
    location = None if remote else settings.mlflow_artifact_root
    try:
        return str(client.create_experiment(settings.experiment_name, artifact_location=location))
    except Exception:
        # Lost a race with another run creating it.
        exp = client.get_experiment_by_name(settings.experiment_name)
        if exp is None:
            raise
        return str(exp.experiment_id)


@dataclass
class ModelRegistry:
    """Alias-based access to one registered model."""

    settings: Settings

    def __post_init__(self) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(
            self.settings.mlflow_tracking_uri, registry_uri=self.settings.mlflow_tracking_uri
        )
        self.name = self.settings.model_name

    def alias_version(self, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.name, alias).version)
        except MlflowException:
            return None

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, version)

    def tag_version(self, version: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, str(value))

    def version_tags(self, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(self.name, version).tags)

    def version_info(self, version: str) -> VersionInfo:
        return version_info(self.client, self.settings.mlflow_tracking_uri, self.name, version)

    def champion(self) -> Champion | None:
        return load_champion(self.settings.mlflow_tracking_uri, self.name)

    def move_champion(self, version: str) -> str | None:
        """Point ``champion`` at ``version``, keeping the one it replaces as previous-champion."""
        previous = self.alias_version(CHAMPION)
        if previous is not None and previous != version:
            self.set_alias(PREVIOUS_CHAMPION, previous)
        self.set_alias(CHAMPION, version)
        return previous

    def find_version_by_tag(self, key: str, value: str) -> str | None:
        versions = self.client.search_model_versions(f"name = '{self.name}'")
        for mv in versions:
            if mv.tags.get(key) == value:
                return str(mv.version)
        return None

    def model_uri(self, version: str) -> str:
        return f"models:/{self.name}/{version}"

    def load_booster(self, version: str) -> Any:
        return load_booster(self.settings.mlflow_tracking_uri, self.name, version)
