"""The model registry behind a small interface: MLflow aliases, never the deprecated stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlops.settings import Settings

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous-champion"


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

    def find_version_by_tag(self, key: str, value: str) -> str | None:
        versions = self.client.search_model_versions(f"name = '{self.name}'")
        for mv in versions:
            if mv.tags.get(key) == value:
                return str(mv.version)
        return None

    def model_uri(self, version: str) -> str:
        return f"models:/{self.name}/{version}"

    def load_booster(self, version: str) -> Any:
        import mlflow
        import mlflow.xgboost

        mlflow.set_tracking_uri(self.settings.mlflow_tracking_uri)

        mlflow.set_registry_uri(self.settings.mlflow_tracking_uri)  # not the process default
        return mlflow.xgboost.load_model(self.model_uri(version))
