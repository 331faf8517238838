"""The Ray Serve application: one registered model version behind ``POST /predict``.

A request carries what is known about a flight before departure. Features are built with the same
``mlops.features.build_features`` the Ray Data transform uses, with weather and plane attributes
looked up from the curated dimensions of the model's feature snapshot. Unknown weather or planes
are predicted anyway, with those features missing, and the response says so.
"""

# No ``from __future__ import annotations`` here: FastAPI must see real annotation objects to
# read the request body, and Serve's replica cannot resolve them from strings.
import posixpath
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Body, FastAPI
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

api = FastAPI(title="flights-delay", version="1")


class FlightRequest(BaseModel):
    """What a caller knows about a flight before it departs."""

    model_config = ConfigDict(extra="forbid")

    year: int = Field(ge=1900, le=2100)
    month: int = Field(ge=1, le=12)
    day: int = Field(ge=1, le=31)
    sched_dep_time: int = Field(ge=0, le=2400, description="local HHMM")
    sched_arr_time: int = Field(ge=0, le=2400, description="local HHMM")
    carrier: str = Field(min_length=2, max_length=3)
    flight: int = Field(ge=0)
    tailnum: str | None = None
    origin: str = Field(min_length=3, max_length=4)
    dest: str = Field(min_length=3, max_length=4)
    distance: float = Field(gt=0)


@dataclass(frozen=True)
class ModelConfig:
    """What a replica needs to load: the model version and where its lookups live."""

    tracking_uri: str
    model_name: str
    version: str
    run_id: str
    dims_uri: str
    storage_options: dict[str, Any]
    alias: str = "champion"
    promoted_at: str = ""


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
    health_check_period_s=5,
    health_check_timeout_s=30,
    max_ongoing_requests=32,
)
@serve.ingress(api)
class FlightDelayModel:
    def __init__(self, config: dict[str, Any]) -> None:
        import mlflow
        import mlflow.xgboost
        import xgboost as xgb

        from mlops.storage import Storage

        self.cfg = ModelConfig(**config)
        mlflow.set_tracking_uri(self.cfg.tracking_uri)
        self.booster = mlflow.xgboost.load_model(
            f"models:/{self.cfg.model_name}/{self.cfg.version}"
        )
        self.booster.set_param({"nthread": 1})
        root, leaf = posixpath.split(self.cfg.dims_uri.rstrip("/"))
        dims = Storage(root, self.cfg.storage_options)
        self.weather = dims.read_parquet(posixpath.join(leaf, "weather.parquet")).to_pandas()
        self.planes = dims.read_parquet(posixpath.join(leaf, "planes.parquet")).to_pandas()
        self._xgb = xgb

    def predict_frame(self, flights: list[FlightRequest]) -> list[dict[str, Any]]:
        import pandas as pd

        from mlops.features import FEATURE_COLUMNS, build_features

        if not flights:
            return []
        frame = pd.DataFrame([f.model_dump() for f in flights])
        feats = build_features(frame, self.weather, self.planes)
        probs = self.booster.predict(self._xgb.DMatrix(feats.loc[:, list(FEATURE_COLUMNS)]))
        out = []
        for p, w, pl in zip(probs, feats["weather_known"], feats["plane_known"], strict=True):
            missing = [name for name, known in (("weather", w), ("plane", pl)) if not known]
            out.append(
                {"probability_late": round(float(p), 6), "late": bool(p >= 0.5), "missing": missing}
            )
        return out

    @api.post("/predict")
    def predict(
        self, body: Annotated[list[FlightRequest] | FlightRequest, Body()]
    ) -> dict[str, Any]:
        flights = body if isinstance(body, list) else [body]
        return {
            "model": self.cfg.model_name,
            "version": self.cfg.version,
            "predictions": self.predict_frame(flights),
        }

    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        self.check_health()
        return {"status": "ok", "model": self.cfg.model_name, "version": self.cfg.version}

    @api.get("/version")
    def version(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self.cfg).items() if k != "storage_options"}

    def check_health(self) -> None:
        if self.booster is None or self.weather is None:
            raise RuntimeError("model or lookups not loaded")


def build_app(config: ModelConfig) -> Any:
    """A bound Serve application for one model version."""
    cfg = {**asdict(config), "promoted_at": config.promoted_at or datetime.now(UTC).isoformat()}
    return FlightDelayModel.bind(cfg)


def app_builder(args: dict[str, Any]) -> Any:
    """Entry point for ``serve run deployments.serve_app:app_builder key=value ...``."""
    return build_app(ModelConfig(**args))
