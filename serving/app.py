"""The Ray Serve application: a router in front of two model slots (blue and green).

- ``FlightModel`` serves one registered model version. Features are built by
  ``mlops.features.request_features``, the pandas-free twin of the ``build_features`` the Ray Data
  transform uses (tests hold the two equal on real flights), with weather and plane attributes
  looked up from the curated dimensions of the model's feature snapshot, so training and serving
  cannot skew. Small batches are scored by the booster's trees compiled to numpy arrays
  (``serving.tree_scoring``: bit for bit XGBoost's answers, checked at load), larger ones by the
  booster in place on a float64 matrix. Requests are scored in dynamic batches
  (``@serve.batch``); every answered row goes to the inference log off the request path.
  ``Scorer`` is that per-request work as a plain class, shared with the bare FastAPI server the
  benchmark compares against.
- ``Router`` is the HTTP ingress, a plain deployment whose ``__call__`` dispatches the routes. It
  validates requests, sends traffic to the primary slot (and a share to a canary slot), and
  exposes ``/predict``, ``/healthz``, ``/version`` and per-slot endpoints for smoke checks.
  Switching traffic is a ``user_config`` change, applied live by ``reconfigure`` without
  restarting anything: promotion and rollback drop no request. The router also loads the
  primary slot's model and, once loaded, scores ``/predict`` for it in process: every hop
  through Ray costs milliseconds of CPU on a small machine.
"""

# No ``from __future__ import annotations``: Serve and pydantic read these annotations at runtime.

import asyncio
import gc
import logging
import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from mlops.settings import Settings
from serving.request import json_response, validate_body
from serving.state import MODEL_MAX_REPLICAS, ServingState, SlotModel

log = logging.getLogger(__name__)
MAX_ROWS_PER_REQUEST = 10_000
ROUTER_REPLICAS = (
    2  # each scores the primary model in process: 1,000-row batches 38.6k -> 54.1k rows/s
)


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


class Scorer:
    """Features, prediction and answer for validated rows: the work per request, without Ray.

    The native booster scores the feature matrix in place (``inplace_predict``): no DMatrix and no
    DataFrame per call, the same probabilities as the registered model's ``predict``. Small
    batches go to the same trees compiled to numpy arrays (``serving.tree_scoring``), checked bit
    for bit against the booster when the model loads: XGBoost's own per-call cost is most of a
    one-flight request's scoring time. ``small_batch_rows=0`` keeps every batch on the booster
    (GPU replicas score on their device).
    """

    def __init__(
        self,
        booster: Any,
        lookups: Any,
        model_name: str,
        version: str,
        small_batch_rows: int | None = None,
    ) -> None:
        from mlops.features import FEATURE_COLUMNS
        from serving.tree_scoring import SMALL_BATCH_ROWS, BatchPredictor

        names = booster.feature_names
        if names is not None and list(names) != list(FEATURE_COLUMNS):
            raise ValueError(f"the model's features {names} are not {list(FEATURE_COLUMNS)}")
        self.booster, self.lookups = booster, lookups
        self.model_name, self.version = model_name, version
        rows = SMALL_BATCH_ROWS if small_batch_rows is None else small_batch_rows
        self.predict = BatchPredictor(booster, rows)

    def score(self, rows: list[dict]) -> tuple[list[dict], dict[str, Any] | None]:
        """Per-row answers, plus the columns the inference log keeps (None for no rows)."""
        from mlops.features import FEATURE_COLUMNS, request_features

        if not rows:
            return [], None
        feats = request_features(rows, self.lookups)
        probs = self.predict(feats.matrix)
        answers = [
            {
                "probability_late": round(p, 6),
                "late": p >= 0.5,
                "missing": [m for m, known in (("weather", w), ("plane", pl)) if not known],
            }
            for p, w, pl in zip(
                probs.tolist(),
                feats.weather_known.tolist(),
                feats.plane_known.tolist(),
                strict=True,
            )
        ]
        logged = {c: feats.matrix[:, i] for i, c in enumerate(FEATURE_COLUMNS)}
        logged.update(
            date=feats.dates,
            carrier=[r["carrier"] for r in rows],
            origin=[r["origin"] for r in rows],
            dest=[r["dest"] for r in rows],
            probability_late=probs.astype("float64"),
            model_version=self.version,
            ts=time.time(),
        )
        return answers, logged

    def answer(self, predictions: list[dict]) -> bytes:
        """The JSON body of a /predict answer (the router adds the slot)."""
        return orjson.dumps(
            {"model": self.model_name, "version": self.version, "predictions": predictions}
        )


@dataclass(frozen=True)
class LoadedModel:
    """One registered version ready to score: booster, lookups, known carriers, scorer."""

    cfg: ModelConfig
    booster: Any
    lookups: Any
    carriers: list[str]
    device: str
    scorer: Scorer


def load_model(cfg: ModelConfig, device: str = "cpu") -> LoadedModel:
    """Load a version's booster from the registry and its lookups from the feature snapshot."""
    from mlops.lake import load_lookups, read_carriers
    from mlops.registry import load_booster

    booster = load_booster(cfg.tracking_uri, cfg.model_name, cfg.version)
    booster.set_param({"nthread": 1, "device": device})
    lookups = load_lookups(cfg.dims_uri, cfg.storage_options)
    carriers = read_carriers(cfg.dims_uri, cfg.storage_options)
    scorer = Scorer(booster, lookups, cfg.model_name, cfg.version, None if device == "cpu" else 0)
    return LoadedModel(cfg, booster, lookups, carriers, device, scorer)


def _predictions_counter() -> Any:
    from ray.serve.metrics import Counter

    return Counter(
        "flights_predictions_total",
        description="Predictions served, by model version.",
        tag_keys=("model_version",),
    )


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
        from serving.inference_log import InferenceLog

        self.cfg = ModelConfig(**config)
        self.device = "cpu"
        if self.cfg.use_gpu:
            import ray

            from mlops.devices import choose_device, cuda_device_visible

            self.device, note = choose_device(ray.get_gpu_ids(), cuda_device_visible())
            log.warning(note)
        model = load_model(self.cfg, self.device)
        self.booster, self.lookups, self.carriers = model.booster, model.lookups, model.carriers
        self.scorer = model.scorer
        self.log = InferenceLog(self.cfg.storage_root, self.cfg.storage_options)
        self.predictions = _predictions_counter()

    def info(self) -> dict:
        d = {k: v for k, v in asdict(self.cfg).items() if k not in ("storage_options",)}
        return {**d, "device": self.device, "known_carriers": self.carriers}

    def check_health(self) -> None:
        if self.booster is None or self.lookups is None:
            raise RuntimeError("model or lookups not loaded")

    def flush_log(self) -> int:
        return self.log.flush()

    async def predict(self, rows: list) -> bytes:
        """The JSON answer for validated rows (bytes: encoded once, here, for the router)."""
        return self.scorer.answer(await self._score(rows) if rows else [])

    # A batch takes what is queued when the replica is free: no added wait for a lone row, and
    # under load the rows that arrived during the previous batch are scored in one call.
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def _score(self, batches: list) -> list:
        """Score many requests' rows in one feature build and one booster call."""
        flat = [row for b in batches for row in b]
        answers, logged = self.scorer.score(flat)
        if logged is not None:
            self.log.append(logged, len(flat))
            self.predictions.inc(len(flat), tags={"model_version": self.cfg.version})
        results, start = [], 0
        for b in batches:
            results.append(answers[start : start + len(b)])
            start += len(b)
        return results


@dataclass(frozen=True)
class LocalModel:
    """The primary slot's model inside the router: scores without a hop, logs like a replica."""

    model: LoadedModel
    carriers: frozenset[str]
    log: Any  # InferenceLog

    def score(self, rows: list[dict]) -> bytes:
        answers, logged = self.model.scorer.score(rows)
        if logged is not None:
            self.log.append(logged, len(rows))
        return self.model.scorer.answer(answers)

    def close(self) -> None:
        self.log.close()


class RequestMetrics:
    """The router's request metrics, counted in process and handed to Ray once a second.

    Prometheus sees them through Ray's metrics: requests by status and slot, errors, a latency
    histogram by slot and predictions by model version. Each Ray metric call costs tens of
    microseconds, so the counters are summed here and added to Ray's in one call per series
    and second; the histogram takes every latency as it comes. A replica that stops loses at
    most its last second of counts.
    """

    FLUSH_EVERY_S = 1.0

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

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
        self.predictions = _predictions_counter()
        self._answered: dict[tuple[str, int], int] = {}
        self._predicted: dict[str, int] = {}
        self._flusher: asyncio.Task | None = None

    def answered(self, slot: str, status: int, latency_ms: float) -> None:
        key = (slot, status)
        self._answered[key] = self._answered.get(key, 0) + 1
        self.latency.observe(latency_ms, tags={"slot": slot})
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    def predicted(self, version: str, rows: int) -> None:
        self._predicted[version] = self._predicted.get(version, 0) + rows

    def flush(self) -> None:
        answered, self._answered = self._answered, {}
        predicted, self._predicted = self._predicted, {}
        for (slot, status), n in answered.items():
            self.requests.inc(n, tags={"status": str(status), "slot": slot})
            if status >= 400:
                self.errors.inc(n)
        for version, n in predicted.items():
            self.predictions.inc(n, tags={"model_version": version})

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.FLUSH_EVERY_S)
            self.flush()


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=256,
    autoscaling_config={
        "min_replicas": ROUTER_REPLICAS,
        "max_replicas": 4,
        "target_ongoing_requests": 64,
    },
    logging_config={"enable_access_log": False, "log_level": "WARNING"},
)
class Router:
    def __init__(self, blue: Any, green: Any, max_rows: int = MAX_ROWS_PER_REQUEST) -> None:
        self.slots = {"blue": blue, "green": green}
        self.max_rows = max_rows
        self.primary, self.canary, self.canary_share = "blue", None, 0.0
        self._info: dict[str, dict] = {}
        self._models: dict[str, ModelConfig] = {}
        self._local: LocalModel | None = None
        self._loading: ModelConfig | None = None
        self._load_lock = threading.Lock()
        self.metrics = RequestMetrics()

    def reconfigure(self, config: dict) -> None:
        """Traffic switch, applied live (no restart): primary slot, canary slot and its share.

        ``models`` names each slot's model. The primary's is also loaded here, in the router, in
        a background thread: once loaded, ``/predict`` traffic for the primary is scored in this
        process (one hop fewer: about half the CPU of a request). Until then, and whenever the
        local model is not the primary's, requests go to the slot deployment, which is warm.
        """
        primary, canary = config.get("primary", "blue"), config.get("canary")
        if primary not in self.slots or (canary is not None and canary not in self.slots):
            raise ValueError(f"unknown slot in {config}")
        models = {k: ModelConfig(**v) for k, v in (config.get("models") or {}).items()}
        with self._load_lock:  # the loader thread checks the same state before it installs
            self._models = models
            self.primary, self.canary = primary, canary
            self._info.clear()
            self.canary_share = float(config.get("canary_share", 0.0)) if canary else 0.0
            want = self._models.get(self.primary)
            if want is not None and want.use_gpu:
                want = None  # GPU replicas score on their device: keep the hop
            local = self._local
            if local is not None and (want is None or local.model.cfg != want):
                self._local = None  # never answer with a model that is no longer the primary's
                threading.Thread(target=local.close, daemon=True).start()
            if want is None or self._local is not None or self._loading == want:
                return
            self._loading = want
        threading.Thread(target=self._load_in_background, args=(want,), daemon=True).start()

    def _load_in_background(self, want: ModelConfig) -> None:
        from serving.inference_log import InferenceLog

        local = None
        try:
            model = load_model(want)
            local = LocalModel(
                model,
                frozenset(model.carriers),
                InferenceLog(want.storage_root, want.storage_options),
            )
            # What the model and its imports left behind lives as long as the replica: keep the
            # garbage collector from rescanning it on the request path (Serve does the same for
            # what a replica builds at start-up).
            gc.collect()
            gc.freeze()
        except Exception as exc:  # the slot deployment keeps answering
            log.warning("router could not load version %s locally: %s", want.version, exc)
        with self._load_lock:
            if self._loading == want:
                self._loading = None
            if local is not None and self._models.get(self.primary) == want:
                self._local, local = local, None
        if local is not None:  # traffic moved on while it loaded
            local.close()

    async def _slot_info(self, slot: str) -> dict:
        if slot not in self._info:
            info = await self.slots[slot].info.remote()
            self._info[slot] = {**info, "carriers": frozenset(info.get("known_carriers") or ())}
        return self._info[slot]

    def _pick_slot(self) -> str:
        if self.canary and random.random() < self.canary_share:
            return self.canary
        return self.primary

    async def __call__(self, request: Request) -> Response:
        """The HTTP ingress: one dispatch on method and path, no web framework in between.

        A FastAPI app here cost a router about a tenth of its CPU per request in middleware and
        routing (benchmarks/README.md); the routes are few and fixed.
        """
        scope = request.scope
        path, root = scope["path"], scope.get("root_path", "").rstrip("/")
        if root and path.startswith(root):  # an application under a route prefix
            path = path[len(root) :]
        method, path = scope["method"], path.rstrip("/") or "/"
        if path == "/predict":
            if method == "POST":
                return await self._predict(request, self._pick_slot())
        elif path in ("/healthz", "/version"):
            if method == "GET":
                answer = self.healthz() if path == "/healthz" else self.version()
                return json_response(await answer)
        elif path.startswith("/slots/") and path.count("/") == 3:
            _, _, slot, action = path.split("/")
            if action in ("predict", "healthz"):
                if method != ("POST" if action == "predict" else "GET"):
                    return json_response({"detail": "Method Not Allowed"}, 405)
                if slot not in self.slots:
                    return json_response({"detail": f"unknown slot {slot!r}"}, 404)
                if action == "predict":
                    return await self._predict(request, slot)
                return json_response(await self.healthz_slot(slot))
            return json_response({"detail": "Not Found"}, 404)
        elif path == "/admin/flush-log":
            if method == "POST":
                return json_response(await self.flush_log())
        else:
            return json_response({"detail": "Not Found"}, 404)
        return json_response({"detail": "Method Not Allowed"}, 405)

    async def _predict(self, request: Request, slot: str) -> Response:
        t0 = time.perf_counter()
        status = 500
        try:
            local = self._local if slot == self.primary else None
            if local is not None:
                status, rows = validate_body(await request.body(), local.carriers, self.max_rows)
            else:
                info = await self._slot_info(slot)
                status, rows = validate_body(await request.body(), info["carriers"], self.max_rows)
            if status != 200:
                return json_response({"detail": rows}, status_code=status)
            if local is not None:
                body = local.score(rows)
                if rows:
                    self.metrics.predicted(local.model.cfg.version, len(rows))
            else:
                body = await self.slots[slot].predict.remote(rows)
            # The answer is already JSON: add the slot without decoding it again.
            return Response(
                body[:-1] + b',"slot":"' + slot.encode() + b'"}', media_type="application/json"
            )
        finally:
            self.metrics.answered(slot, status, (time.perf_counter() - t0) * 1000)

    async def healthz(self) -> dict:
        await self.slots[self.primary].check_health.remote()  # the replica's own health check
        info = await self._slot_info(self.primary)
        local = self._local
        return {
            "status": "ok",
            "model": info["model_name"],
            "version": info["version"],
            "slot": self.primary,
            # "router": this replica scores the primary in-process; "slot": it forwards
            "scored_by": "router" if local is not None else "slot",
            "replica": serve.get_replica_context().replica_id.unique_id,
        }

    async def healthz_slot(self, slot: str) -> dict:
        self._info.pop(slot, None)  # a re-deployed slot may hold a new version
        await self.slots[slot].check_health.remote()
        info = await self._slot_info(slot)
        return {"status": "ok", "version": info["version"], "slot": slot}

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

    async def flush_log(self) -> dict:
        local = self._local
        written = local.log.flush() if local is not None else 0
        for handle in self.slots.values():
            written += await handle.flush_log.remote()
        return {"written": written}


def deployment_version(*parts: Any) -> str:
    """A deployment's version: the replicas' code and their constructor arguments.

    Serve restarts a deployment's replicas when its version changes and otherwise applies a
    new ``user_config`` or autoscaling config in place. Without an explicit version every
    ``serve.run`` is a new version: each promotion restarted the router, and under the HAProxy
    ingress a restarting router can drop a connection. (``version`` is Serve's internal
    option, the one its declarative config path sets.)
    """
    import hashlib
    import json

    from mlops.fingerprint import source_digest

    digest = hashlib.sha256()
    # The code a replica runs: this module and what it imports from serving/ and the core (never
    # the training or upkeep stages, nor core modules only they use, such as the backup format),
    # so a change to them restarts no router. The same files give the same version everywhere.
    digest.update(source_digest("serving.app", ("serving", "mlops")).encode())
    digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def build_app(slots: dict, router_config: dict, router_replicas: int = ROUTER_REPLICAS) -> Any:
    """The application for a serving state: both slots plus the router's traffic config.

    ``router_replicas`` is the router's minimum (autoscaling up to twice that, at least 4).
    A slot restarts only when its model changes; the router never restarts for a traffic
    change or a new model (its ``user_config``), so promotion and rollback drop no request.
    """
    models = {
        name: FlightModel.options(
            name=f"model-{name}",
            ray_actor_options={"num_cpus": 0.25, "num_gpus": cfg.gpu_share if cfg.use_gpu else 0},
            version=deployment_version("model", asdict(cfg)),
            _internal=True,
        ).bind(asdict(cfg))
        for name, cfg in slots.items()
    }
    router_config = {**router_config, "models": {n: asdict(c) for n, c in slots.items()}}
    autoscaling = {
        "min_replicas": router_replicas,
        "max_replicas": max(4, 2 * router_replicas),
        "target_ongoing_requests": 64,
    }
    return Router.options(
        user_config=router_config,
        autoscaling_config=autoscaling,
        version=deployment_version("router", MAX_ROWS_PER_REQUEST),
        _internal=True,
    ).bind(models["blue"], models["green"])


def model_config(settings: Settings, slot: SlotModel, use_gpu: bool) -> ModelConfig:
    return ModelConfig(
        tracking_uri=settings.mlflow_tracking_uri,
        model_name=settings.model_name,
        version=slot.version,
        run_id=slot.run_id,
        dims_uri=slot.dims_uri,
        storage_root=settings.storage_root,
        storage_options=settings.storage_options,
        promoted_at=slot.promoted_at,
        use_gpu=use_gpu,
        gpu_share=settings.serve_gpus_per_replica,
    )


def app_from_state(settings: Settings, state: ServingState) -> Any:
    """The Serve application for a state; model replicas take a GPU when the cluster has one."""
    import ray

    use_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1
    slots = {name: model_config(settings, m, use_gpu) for name, m in state.slots.items()}
    return build_app(slots, state.router_config(), settings.serve_router_replicas)


def app_builder(args: dict) -> Any:
    """Entry point for ``serve run deployments/serve_config.yaml`` (and ``serve deploy``).

    Rebuilds the application from the saved serving state under the storage root.
    """
    from mlops.settings import load_settings
    from serving.state import load_state

    settings = load_settings(**{k: v for k, v in args.items() if k in ("storage_root", "home")})
    state = load_state(settings)
    if state is None:
        raise RuntimeError(f"no serving state under {settings.storage_root}: run `mlops run` first")
    return app_from_state(settings, state)
