"""The one place that reads the environment.

Everything has an embedded default under ``MLOPS_HOME`` (local Ray, a temporary Prefect API,
MLflow on SQLite, local files). Point any location elsewhere with the environment: the same code
then runs against a Ray cluster, a Prefect server, an MLflow server and S3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Resolved, frozen configuration that flows pass down to tasks."""

    model_config = SettingsConfigDict(env_prefix="MLOPS_", frozen=True, extra="ignore")

    home: Path = Field(default=Path(".mlops"), description="Root of all embedded state.")
    storage_root: str = Field(
        default="",
        description="Data lake root, a local path or s3://bucket/prefix. Default: <home>/data.",
    )
    mlflow_tracking_uri: str = Field(
        default="",
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "MLOPS_MLFLOW_TRACKING_URI"),
    )
    mlflow_backend_store_uri: str = Field(
        default="",
        description="The MLflow server's backend store (postgresql://...), for backups with "
        "pg_dump, when MLFLOW_TRACKING_URI is an http:// server. Default: the tracking URI.",
    )
    mlflow_artifact_root: str = Field(
        default="",
        description="Artifact location for new experiments. Default: <home>/mlartifacts.",
    )
    ray_address: str | None = Field(
        default=None, validation_alias=AliasChoices("RAY_ADDRESS", "MLOPS_RAY_ADDRESS")
    )
    prefect_api_url: str | None = Field(
        default=None, validation_alias=AliasChoices("PREFECT_API_URL", "MLOPS_PREFECT_API_URL")
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLOPS_S3_ENDPOINT_URL"
        ),
    )
    model_name: str = "flights-delay"
    experiment_name: str = "flights-delay"
    serve_host: str = "127.0.0.1"
    serve_port: int = 8000
    serve_app_name: str = "flights"
    serve_gpus_per_replica: float = Field(
        default=0.1, ge=0, le=1, description="GPU share of a model replica on a GPU cluster."
    )
    serve_router_replicas: int = Field(
        default=2, ge=1, description="Minimum router replicas; each scores the primary model."
    )
    serve_ingress: Literal["haproxy", "proxy"] = Field(
        default="haproxy",
        description="Serve's HTTP ingress: 'haproxy' (Serve's managed HAProxy on the port, "
        "forwarding to the router replicas' own HTTP servers) or 'proxy' (Serve's Python proxy "
        "actors, which forward each request to a replica over Ray).",
    )
    serve_proxy_location: str = Field(
        default="EveryNode",
        description="Where Serve runs HTTP proxies: EveryNode, HeadOnly (one host, many nodes).",
    )
    tune_gpus_per_trial: float = Field(
        default=1.0, ge=0, description="GPUs a Tune trial asks for on a GPU cluster (0: none)."
    )
    embedded_prefect: bool = Field(
        default=False,
        description="Set by the runtime when PREFECT_API_URL names a local API it starts itself.",
    )
    ray_num_cpus: int | None = Field(
        default=None, description="CPUs for an embedded Ray instance (default: all)."
    )
    backup_root: str = Field(
        default="",
        validation_alias=AliasChoices("MLOPS_BACKUP_ROOT"),
        description="Backups, a local path or s3://bucket/prefix. Default: <home>/backups.",
    )
    dr_pointer_root: str = Field(
        default="",
        validation_alias=AliasChoices("MLOPS_DR_ROOT", "MLOPS_DR_POINTER_ROOT"),
        description="Disaster-recovery checkpoint (pointer to the latest good backup). "
        "Default: <home>/dr.",
    )
    # The drift webhook (deployments/webhook.py, `mlops webhook`).
    webhook_secret: SecretStr | None = Field(
        default=None, description="Shared HMAC-SHA256 secret of the drift webhook."
    )
    webhook_secret_block: str | None = Field(
        default=None, description="Name of a Prefect Secret block holding that secret instead."
    )
    webhook_host: str = "127.0.0.1"
    webhook_port: int = Field(default=8787, ge=0, le=65535)
    webhook_max_body_bytes: int = Field(default=64 * 1024, gt=0)
    webhook_replay_window_s: int = Field(
        default=300, gt=0, description="Accepted clock skew; a signature is accepted once in it."
    )
    webhook_cooldown_s: int = Field(
        default=3600, gt=0, description="The same alert id inside it emits one drift event."
    )

    @model_validator(mode="after")
    def _resolve_defaults(self) -> Settings:
        home = self.home.expanduser().resolve()
        object.__setattr__(self, "home", home)
        if not self.storage_root:
            object.__setattr__(self, "storage_root", str(home / "data"))
        if not self.mlflow_tracking_uri:
            object.__setattr__(self, "mlflow_tracking_uri", f"sqlite:///{home / 'mlflow.db'}")
        if not self.mlflow_backend_store_uri:
            object.__setattr__(self, "mlflow_backend_store_uri", self.mlflow_tracking_uri)
        if not self.mlflow_artifact_root:
            object.__setattr__(self, "mlflow_artifact_root", str(home / "mlartifacts"))
        if not self.backup_root:
            object.__setattr__(self, "backup_root", str(home / "backups"))
        if not self.dr_pointer_root:
            object.__setattr__(self, "dr_pointer_root", str(home / "dr"))
        return self

    @property
    def serve_url(self) -> str:
        return f"http://{self.serve_host}:{self.serve_port}"

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"

    @property
    def storage_options(self) -> dict[str, object]:
        """fsspec options for s3:// locations (credentials come from the standard AWS env)."""
        if self.s3_endpoint_url:
            return {"client_kwargs": {"endpoint_url": self.s3_endpoint_url}}
        return {}


def load_settings(**overrides: object) -> Settings:
    """Read the environment now (never at import time) and apply explicit overrides."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
