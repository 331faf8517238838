"""The Ray Serve application: a router in front of two model slots (blue and green).

- ``FlightModel`` serves one registered model version. Features are built with the same
  ``mlops.features.build_features`` the Ray Data transform uses, with weather and plane
  attributes looked up from the curated dimensions of the model's feature snapshot, so training
  and serving cannot skew. Requests are scored in dynamic batches (``@serve.batch``); every
  answered row goes to the inference log off the request path.
- ``Router`` is the HTTP ingress. It validates requests, sends traffic to the primary slot (and a
  share to a canary slot), and exposes ``/predict``, ``/healthz``, ``/version`` and per-slot
  endpoints for smoke checks. Switching traffic is a ``user_config`` change, applied live by
  ``reconfigure`` without restarting anything: promotion and rollback drop no request.
"""

# No ``from __future__ import annotations``: FastAPI and Serve read these annotations at runtime.

import logging
import posixpath
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from ray import serve

from mlops.serving_state import MODEL_MAX_REPLICAS

log = logging.getLogger(__name__)
api = FastAPI(title="flights-delay", version="2")
MAX_ROWS_PER_REQUEST = 10_000


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


_ONE_OR_MANY = TypeAdapter(list[FlightRequest] | FlightRequest)


@dataclass(frozen=True)
class ModelConfig:
    """What a model replica needs: the version to load and where its lookups live."""

    tracking_uri: str
    model_name: str
    version: str
    run_id: str
    dims_uri: str
    storage_root: str
    storage_options: dict
    promoted_at: str = ""
    use_gpu: bool = False
    gpu_share: float = 0.1  # of one GPU per replica: a small booster needs little of a device


def validate_request(
    payload: Any, known_carriers: frozenset[str] | None, max_rows: int
) -> tuple[int, Any]:
    """(status, rows or error detail): 413 oversized, 422 invalid naming the field, 200 rows."""
    if isinstance(payload, list) and len(payload) > max_rows:
        return 413, f"batch of {len(payload)} rows exceeds the limit of {max_rows}"
    try:
        parsed = _ONE_OR_MANY.validate_python(payload)
    except ValidationError as exc:
        return 422, [
            {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()
        ]
    rows = parsed if isinstance(parsed, list) else [parsed]
    if known_carriers:
        bad = [
            {"loc": [i, "carrier"], "msg": f"unknown carrier code {r.carrier!r}", "type": "value"}
            for i, r in enumerate(rows)
            if r.carrier not in known_carriers
        ]
        if bad:
            return 422, bad
    return 200, [r.model_dump() for r in rows]


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
    health_check_period_s=5,
    health_check_timeout_s=30,
    max_ongoing_requests=64,
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": MODEL_MAX_REPLICAS,
        "target_ongoing_requests": 16,
    },
    logging_config={"enable_access_log": False, "log_level": "WARNING"},
)
class FlightModel:
    def __init__(self, config: dict) -> None:
        import json

        import mlflow
        import mlflow.xgboost
        import xgboost as xgb
        from ray.serve.metrics import Counter

        from mlops.inference_log import InferenceLog
        from mlops.storage import Storage

        self.cfg = ModelConfig(**config)
        mlflow.set_tracking_uri(self.cfg.tracking_uri)
        mlflow.set_registry_uri(self.cfg.tracking_uri)  # not the process default
        self.booster = mlflow.xgboost.load_model(
            f"models:/{self.cfg.model_name}/{self.cfg.version}"
        )
        self.device = "cpu"
        if self.cfg.use_gpu:
            import ray

            from tasks.tune import choose_device, cuda_device_visible

            self.device, note = choose_device(ray.get_gpu_ids(), cuda_device_visible())
            log.warning(note)
        self.booster.set_param({"nthread": 1, "device": self.device})
        root, leaf = posixpath.split(self.cfg.dims_uri.rstrip("/"))
        dims = Storage(root, self.cfg.storage_options)
        from mlops.features import load_lookups

        self.lookups = load_lookups(self.cfg.dims_uri, self.cfg.storage_options)
        carriers = posixpath.join(leaf, "carriers.json")
        self.carriers = (
            sorted(json.loads(dims.read_bytes(carriers))) if dims.exists(carriers) else []
        )
        self._xgb = xgb
        self.log = InferenceLog(self.cfg.storage_root, self.cfg.storage_options)
        self.predictions = Counter(
            "flights_predictions_total",
            description="Predictions served, by model version.",
            tag_keys=("model_version",),
        )

    def info(self) -> dict:
        d = {k: v for k, v in asdict(self.cfg).items() if k not in ("storage_options",)}
        return {**d, "device": self.device, "known_carriers": self.carriers}

    def check_health(self) -> None:
        if self.booster is None or self.lookups is None:
            raise RuntimeError("model or lookups not loaded")

    def flush_log(self) -> int:
        return self.log.flush()

    async def predict(self, rows: list) -> dict:
        preds = await self._score(rows) if rows else []
        return {"model": self.cfg.model_name, "version": self.cfg.version, "predictions": preds}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _score(self, batches: list) -> list:
        """Score many requests' rows in one feature build and one booster call."""
        import pandas as pd

        from mlops.features import FEATURE_COLUMNS, build_features

        sizes = [len(b) for b in batches]
        flat = [row for b in batches for row in b]
        if not flat:
            return [[] for _ in batches]
        feats = build_features(pd.DataFrame(flat), self.lookups)
        x = feats.loc[:, list(FEATURE_COLUMNS)]
        probs = self.booster.predict(self._xgb.DMatrix(x))
        out = []
        for p, w, pl in zip(
            probs.tolist(),
            feats["weather_known"].tolist(),
            feats["plane_known"].tolist(),
            strict=True,
        ):
            missing = [name for name, known in (("weather", w), ("plane", pl)) if not known]
            out.append({"probability_late": round(p, 6), "late": p >= 0.5, "missing": missing})
        logged = x.assign(
            date=feats["date"].to_numpy(),
            carrier=[r["carrier"] for r in flat],
            origin=[r["origin"] for r in flat],
            dest=[r["dest"] for r in flat],
            probability_late=probs,
            model_version=self.cfg.version,
            ts=time.time(),
        )
        self.log.append(logged)
        self.predictions.inc(len(flat), tags={"model_version": self.cfg.version})
        results, start = [], 0
        for n in sizes:
            results.append(out[start : start + n])
            start += n
        return results


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=256,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 64},
    logging_config={"enable_access_log": False, "log_level": "WARNING"},
)
@serve.ingress(api)
class Router:
    def __init__(self, blue: Any, green: Any, max_rows: int = MAX_ROWS_PER_REQUEST) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.slots = {"blue": blue, "green": green}
        self.max_rows = max_rows
        self.primary, self.canary, self.canary_share = "blue", None, 0.0
        self._info: dict[str, dict] = {}
        self.requests = Counter(
            "flights_requests_total",
            description="HTTP requests to /predict, by status and slot.",
            tag_keys=("status", "slot"),
        )
        self.errors = Counter(
            "flights_request_errors_total", description="Requests answered with an error status."
        )
        self.latency = Histogram(
            "flights_request_latency_ms",
            description="Latency of /predict in milliseconds.",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000],
            tag_keys=("slot",),
        )

    def reconfigure(self, config: dict) -> None:
        """Traffic switch, applied live (no restart): primary slot, canary slot and its share."""
        primary, canary = config.get("primary", "blue"), config.get("canary")
        if primary not in self.slots or (canary is not None and canary not in self.slots):
            raise ValueError(f"unknown slot in {config}")
        self.primary, self.canary = primary, canary
        self._info.clear()
        self.canary_share = float(config.get("canary_share", 0.0)) if canary else 0.0

    async def _slot_info(self, slot: str) -> dict:
        if slot not in self._info:
            self._info[slot] = await self.slots[slot].info.remote()
        return self._info[slot]

    def _pick_slot(self) -> str:
        if self.canary and random.random() < self.canary_share:
            return self.canary
        return self.primary

    async def _predict(self, request: Request, slot: str) -> JSONResponse:
        t0 = time.perf_counter()
        status = 500
        try:
            try:
                payload = await request.json()
            except ValueError:
                status = 400
                return JSONResponse({"detail": "body is not valid JSON"}, status_code=400)
            info = await self._slot_info(slot)
            carriers = frozenset(info.get("known_carriers") or ())
            status, rows = validate_request(payload, carriers, self.max_rows)
            if status != 200:
                return JSONResponse({"detail": rows}, status_code=status)
            body = await self.slots[slot].predict.remote(rows)
            return JSONResponse({**body, "slot": slot})
        finally:
            self.requests.inc(tags={"status": str(status), "slot": slot})
            if status >= 400:
                self.errors.inc()
            self.latency.observe((time.perf_counter() - t0) * 1000, tags={"slot": slot})

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        return await self._predict(request, self._pick_slot())

    @api.post("/slots/{slot}/predict")
    async def predict_slot(self, slot: str, request: Request) -> JSONResponse:
        if slot not in self.slots:
            return JSONResponse({"detail": f"unknown slot {slot!r}"}, status_code=404)
        return await self._predict(request, slot)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        await self.slots[self.primary].check_health.remote()  # the replica's own health check
        info = await self._slot_info(self.primary)
        return {
            "status": "ok",
            "model": info["model_name"],
            "version": info["version"],
            "slot": self.primary,
        }

    @api.get("/slots/{slot}/healthz")
    async def healthz_slot(self, slot: str) -> JSONResponse:
        if slot not in self.slots:
            return JSONResponse({"detail": f"unknown slot {slot!r}"}, status_code=404)
        self._info.pop(slot, None)  # a re-deployed slot may hold a new version
        await self.slots[slot].check_health.remote()
        info = await self._slot_info(slot)
        return JSONResponse({"status": "ok", "version": info["version"], "slot": slot})

    @api.get("/version")
    async def version(self) -> dict:
        info = await self._slot_info(self.primary)
        out = {
            "model": info["model_name"],
            "version": info["version"],
            "alias": "champion",
            "run_id": info["run_id"],
            "promoted_at": info["promoted_at"],
            "slot": self.primary,
            "device": info["device"],
        }
        if self.canary:
            canary = await self._slot_info(self.canary)
            out["canary"] = {
                "version": canary["version"],
                "share": self.canary_share,
                "slot": self.canary,
            }
        return out

    @api.post("/admin/flush-log")
    async def flush_log(self) -> dict:
        written = 0
        for handle in self.slots.values():
            written += await handle.flush_log.remote()
        return {"written": written}


def build_app(slots: dict, router_config: dict) -> Any:
    """The application for a serving state: both slots plus the router's traffic config."""
    models = {
        name: FlightModel.options(
            name=f"model-{name}",
            ray_actor_options={"num_cpus": 0.25, "num_gpus": cfg.gpu_share if cfg.use_gpu else 0},
        ).bind(asdict(cfg))
        for name, cfg in slots.items()
    }
    return Router.options(user_config=router_config).bind(models["blue"], models["green"])


def app_builder(args: dict) -> Any:
    """Entry point for ``serve run deployments/serve_config.yaml`` (and ``serve deploy``).

    Rebuilds the application from the saved serving state under the storage root.
    """
    from mlops.settings import load_settings
    from tasks.promote import app_from_state, load_state

    settings = load_settings(**{k: v for k, v in args.items() if k in ("storage_root", "home")})
    state = load_state(settings)
    if state is None:
        raise RuntimeError(f"no serving state under {settings.storage_root}: run `mlops run` first")
    return app_from_state(settings, state)
