"""Promote: put the gate's winner on Ray Serve, health-check it, then move the ``champion`` alias.

A promoted challenger is first deployed as a separate candidate application on its own route. Only
when it answers ``/healthz`` and its predictions on a smoke set of real flights match what the
registry model gives offline is the live application switched to it and the alias moved. A failed
candidate is removed: the previous champion keeps serving and the alias stays where it was.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from mlops.errors import PromotionFailed
from mlops.registry import CHAMPION, PREVIOUS_CHAMPION, ModelRegistry
from mlops.results import FeatureSet, PromotionDecision, RegisteredModel, ServingResult
from mlops.settings import Settings
from tasks.common import stage

SMOKE_TOLERANCE = 1e-5


def smoke_flights(
    storage_root: str, storage_options: dict, features: FeatureSet, n: int = 8
) -> list[dict[str, Any]]:
    """Real flights from the test window, as serving requests."""
    from mlops.storage import Storage
    from tasks.ingest import partition_path

    storage = Storage(storage_root, storage_options)
    last_day = features.split_bounds["test"][1]
    frame = storage.read_parquet(partition_path("flights", last_day)).to_pandas()
    return to_requests(frame.head(n))


def to_requests(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Serving request bodies from raw flight rows (post-departure columns are dropped)."""
    out = []
    for row in frame.to_dict(orient="records"):
        out.append(
            {
                "year": int(row["year"]),
                "month": int(row["month"]),
                "day": int(row["day"]),
                "sched_dep_time": int(row["sched_dep_time"]),
                "sched_arr_time": int(row["sched_arr_time"]),
                "carrier": str(row["carrier"]),
                "flight": int(row["flight"]),
                "tailnum": None if pd.isna(row["tailnum"]) else str(row["tailnum"]),
                "origin": str(row["origin"]),
                "dest": str(row["dest"]),
                "distance": float(row["distance"]),
            }
        )
    return out


def offline_predictions(
    registry: ModelRegistry,
    version: str,
    features: FeatureSet,
    requests: list[dict[str, Any]],
    storage_options: dict,
) -> np.ndarray:
    """What the registry model gives for the requests outside Serve, through the same features."""
    import posixpath

    import xgboost as xgb

    from mlops.features import FEATURE_COLUMNS, build_features
    from mlops.storage import Storage

    root, leaf = posixpath.split(features.dims_uri.rstrip("/"))
    dims = Storage(root, storage_options)
    weather = dims.read_parquet(posixpath.join(leaf, "weather.parquet")).to_pandas()
    planes = dims.read_parquet(posixpath.join(leaf, "planes.parquet")).to_pandas()
    feats = build_features(pd.DataFrame(requests), weather, planes)
    booster = registry.load_booster(version)
    return booster.predict(xgb.DMatrix(feats.loc[:, list(FEATURE_COLUMNS)]))


def check_endpoint(
    base_url: str,
    requests: list[dict[str, Any]],
    expected: np.ndarray,
    version: str,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Health-check over HTTP and compare smoke predictions; raises PromotionFailed."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = ""
    with httpx.Client(timeout=30.0) as client:
        while time.monotonic() < deadline:
            try:
                health = client.get(f"{base_url}/healthz")
                if health.status_code == 200 and health.json().get("version") == version:
                    break
                last = f"/healthz answered {health.status_code}"
            except httpx.HTTPError as exc:
                last = f"/healthz unreachable: {exc}"
            time.sleep(0.5)
        else:
            raise PromotionFailed(f"health check failed at {base_url}: {last}")
        resp = client.post(f"{base_url}/predict", json=requests)
    if resp.status_code != 200:
        raise PromotionFailed(f"smoke requests failed at {base_url}: HTTP {resp.status_code}")
    body = resp.json()
    got = np.array([p["probability_late"] for p in body["predictions"]])
    if body.get("version") != version or got.shape != expected.shape:
        raise PromotionFailed(
            f"smoke answer came from version {body.get('version')}, not {version}"
        )
    worst = float(np.max(np.abs(got - expected))) if len(got) else 0.0
    if worst > SMOKE_TOLERANCE:
        raise PromotionFailed(f"smoke predictions differ from the registry model by {worst:.2e}")
    return body


def ensure_serve(settings: Settings) -> str:
    """Start Ray Serve's controller and HTTP proxy if they are not running; returns the URL."""
    from ray import serve

    serve.start(http_options={"host": settings.serve_host, "port": settings.serve_port})
    return settings.serve_url


def deploy(app: Any, name: str, route: str) -> None:
    """Deploy and wait until the application is RUNNING (raises if it fails to start)."""
    from ray import serve

    serve.run(app, name=name, route_prefix=route, blocking=False)


def promote(
    settings: Settings,
    decision: PromotionDecision,
    model: RegisteredModel,
    features: FeatureSet,
) -> ServingResult:

    from deployments.serve_app import ModelConfig, build_app

    registry = ModelRegistry(settings)
    ensure_serve(settings)
    requests = smoke_flights(settings.storage_root, settings.storage_options, features)

    def config_for(version: str) -> ModelConfig:
        run_id = registry.client.get_model_version(settings.model_name, version).run_id
        return ModelConfig(
            tracking_uri=settings.mlflow_tracking_uri,
            model_name=settings.model_name,
            version=version,
            run_id=run_id,
            dims_uri=features.dims_uri,
            storage_options=settings.storage_options,
        )

    live_url = settings.serve_url
    serving = _serving_version(live_url)
    if decision.promote:
        version = model.version
        try:
            expected = offline_predictions(
                registry, version, features, requests, settings.storage_options
            )
        except Exception as exc:
            raise PromotionFailed(
                f"version {version} not promoted: it failed to load from the registry: "
                f"{_one_line(exc)}"
            ) from None
        if serving is None:
            # Nothing is live to protect: deploy straight to the live route and check it there.
            body = _deploy_checked(
                build_app(config_for(version)),
                settings.serve_app_name,
                "/",
                live_url,
                requests,
                expected,
                version,
            )
        else:
            # Blue-green: the candidate proves itself on its own route before the switch.
            candidate = f"{settings.serve_app_name}-candidate"
            _deploy_checked(
                build_app(config_for(version)),
                candidate,
                "/candidate",
                f"{live_url}/candidate",
                requests,
                expected,
                version,
            )
            deploy(build_app(config_for(version)), settings.serve_app_name, "/")
            body = check_endpoint(live_url, requests, expected, version)
            _delete_quietly(candidate)
        previous = registry.alias_version(CHAMPION)
        if previous is not None:
            registry.set_alias(PREVIOUS_CHAMPION, previous)
        registry.set_alias(CHAMPION, version)
        detail = f"version {version} promoted; previous champion {previous or 'none'}"
    else:
        version = decision.champion_version or model.version
        expected = offline_predictions(
            registry, version, features, requests, settings.storage_options
        )
        if serving != version:
            deploy(build_app(config_for(version)), settings.serve_app_name, "/")
        body = check_endpoint(live_url, requests, expected, version)
        detail = f"champion version {version} kept serving; challenger {model.version} not promoted"
    return ServingResult(
        url=f"{live_url}/predict",
        app_name=settings.serve_app_name,
        model_version=version,
        promoted=decision.promote,
        alias_moved=decision.promote,
        sample_request=requests[0],
        sample_prediction={"version": body["version"], **body["predictions"][0]},
        detail=detail,
    )


def _deploy_checked(
    app: Any,
    name: str,
    route: str,
    url: str,
    requests: list[dict[str, Any]],
    expected: np.ndarray,
    version: str,
) -> dict[str, Any]:
    """Deploy and health/smoke-check; on any failure remove the app and raise PromotionFailed."""
    try:
        deploy(app, name, route)
        return check_endpoint(url, requests, expected, version)
    except Exception as exc:
        _delete_quietly(name)
        reason = exc if isinstance(exc, PromotionFailed) else f"failed to deploy: {_one_line(exc)}"
        raise PromotionFailed(f"version {version} not promoted: {reason}") from None


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


def _serving_version(base_url: str) -> str | None:
    import httpx

    try:
        resp = httpx.get(f"{base_url}/healthz", timeout=5.0)
        return resp.json().get("version") if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def _delete_quietly(app_name: str) -> None:
    from ray import serve

    try:
        serve.delete(app_name)
    except Exception:
        pass


@stage("start_serving")
def start_serving(settings: Settings) -> str:
    """Prefect wrapper: bring Serve up early, so its start-up overlaps the training stages."""
    return ensure_serve(settings)


@stage("promote_model", retries=0)
def promote_model(
    settings: Settings,
    decision: PromotionDecision,
    model: RegisteredModel,
    features: FeatureSet,
) -> ServingResult:
    """Prefect wrapper: deploy and switch, or keep the champion serving; never retried blindly."""
    from prefect import get_run_logger

    result = promote(settings, decision, model, features)
    get_run_logger().info("%s; serving at %s", result.detail, result.url)
    return result
