"""Promote: put the gate's winner on Ray Serve, health-check it, then move the ``champion`` alias.

The application has two model slots behind a router (``deployments/serve_app.py``). Blue-green
(the default): the challenger is loaded into the standby slot beside the live champion, checked
over HTTP (``/healthz`` and a smoke set of real flights whose predictions must match the registry
model offline), then traffic switches and the alias moves. The previous champion stays warm in the
other slot for an instant rollback. Canary: a share of traffic goes to the standby slot until the
canary is promoted or aborted. A challenger that fails to load, check or answer never gets
traffic: the previous state is put back and the alias stays where it was.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from mlops.errors import PromotionFailed
from mlops.registry import CHAMPION, PREVIOUS_CHAMPION, ModelRegistry
from mlops.results import FeatureSet, PromotionDecision, RegisteredModel, ServingResult
from mlops.serving_state import (
    STATE_PATH,
    ServingState,
    ServingStateError,
    SlotModel,
    finish_canary,
    initial,
    rollback,
    stage_on_standby,
    start_canary,
    switch,
)
from mlops.settings import Settings
from mlops.storage import Storage
from tasks.common import stage

SMOKE_TOLERANCE = 1e-5
STRATEGIES = ("blue_green", "canary")
log = logging.getLogger(__name__)


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
    import xgboost as xgb

    from mlops.features import FEATURE_COLUMNS, build_features, load_lookups

    feats = build_features(pd.DataFrame(requests), load_lookups(features.dims_uri, storage_options))
    booster = registry.load_booster(version)
    return booster.predict(xgb.DMatrix(feats.loc[:, list(FEATURE_COLUMNS)]))


def check_slot(
    base_url: str,
    slot: str,
    requests: list[dict[str, Any]],
    expected: np.ndarray,
    version: str,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Health-check one slot over HTTP and compare its smoke predictions; raises PromotionFailed."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = ""
    with httpx.Client(timeout=30.0) as client:
        while time.monotonic() < deadline:
            try:
                health = client.get(f"{base_url}/slots/{slot}/healthz")
                if health.status_code == 200 and health.json().get("version") == version:
                    break
                last = f"/healthz answered {health.status_code}: {health.text[:200]}"
            except httpx.HTTPError as exc:
                last = f"/healthz unreachable: {exc}"
            time.sleep(0.5)
        else:
            raise PromotionFailed(f"health check of slot {slot} failed: {last}")
        resp = client.post(f"{base_url}/slots/{slot}/predict", json=requests)
    if resp.status_code != 200:
        raise PromotionFailed(f"smoke requests to slot {slot} failed: HTTP {resp.status_code}")
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


def live_version(base_url: str) -> str | None:
    """The version the live application's primary slot serves, or None when nothing answers."""
    import httpx

    try:
        resp = httpx.get(f"{base_url}/version", timeout=5.0)
        return resp.json().get("version") if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def ensure_serve(settings: Settings) -> str:
    """Start Ray Serve's controller and HTTP ingress if they are not running; returns the URL.

    The controller gets the ingress environment itself: it starts the proxies and replicas,
    whichever job first started Serve.
    """
    from ray import serve

    from mlops.runtime import serve_env

    serve.start(
        proxy_location=settings.serve_proxy_location,
        http_options={"host": settings.serve_host, "port": settings.serve_port},
        controller_options={"runtime_env": {"env_vars": serve_env(settings)}},
    )
    return settings.serve_url


def load_state(settings: Settings) -> ServingState | None:
    storage = Storage(settings.storage_root, settings.storage_options)
    return (
        ServingState.from_dict(storage.read_json(STATE_PATH))
        if storage.exists(STATE_PATH)
        else None
    )


def save_state(settings: Settings, state: ServingState) -> None:
    Storage(settings.storage_root, settings.storage_options).write_json(STATE_PATH, state.to_dict())


def model_config(settings: Settings, slot: SlotModel, use_gpu: bool) -> Any:
    from deployments.serve_app import ModelConfig

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

    from deployments.serve_app import build_app

    use_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1
    slots = {name: model_config(settings, m, use_gpu) for name, m in state.slots.items()}
    return build_app(slots, state.router_config(), settings.serve_router_replicas)


def deploy_state(settings: Settings, state: ServingState, timeout_s: float = 120.0) -> None:
    """Apply a state and return once the router routes by it.

    Unchanged slots are untouched and a traffic change restarts nothing: it is a ``user_config``
    change that Serve hands to the running router replicas a moment after ``serve.run``
    returns, so the live ``/version`` is read until every replica reports the new routing.
    """
    from ray import serve

    serve.run(
        app_from_state(settings, state),
        name=settings.serve_app_name,
        route_prefix="/",
        blocking=False,
    )
    wait_until_routed(settings, state, timeout_s)


def routed_as(answer: dict[str, Any] | None, state: ServingState) -> bool:
    """Whether a router's ``/version`` answer shows the state's primary and canary."""
    if answer is None:
        return False
    canary = None
    if state.canary:
        canary = {
            "version": state.slots[state.canary].version,
            "share": state.canary_share,
            "slot": state.canary,
        }
    return (
        answer.get("slot") == state.primary
        and answer.get("version") == state.primary_model.version
        and answer.get("canary") == canary
    )


def wait_until_routed(settings: Settings, state: ServingState, timeout_s: float) -> None:
    import httpx

    # The ingress spreads requests over the router replicas: enough answers in a row reach each.
    need = 2 * max(4, 2 * settings.serve_router_replicas)
    streak, deadline = 0, time.monotonic() + timeout_s
    with httpx.Client(timeout=10.0) as client:
        while streak < need:
            if time.monotonic() > deadline:
                raise ServingStateError(
                    f"the application at {settings.serve_url} did not route to version "
                    f"{state.primary_model.version} (slot {state.primary}) "
                    f"within {timeout_s:.0f}s"
                )
            try:
                resp = client.get(f"{settings.serve_url}/version")
                answer = resp.json() if resp.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                answer = None
            ok = routed_as(answer, state)
            streak = streak + 1 if ok else 0
            if not ok:
                time.sleep(0.2)


def slot_model_for(
    settings: Settings, registry: ModelRegistry, version: str, dims_uri: str
) -> SlotModel:
    run_id = registry.client.get_model_version(settings.model_name, version).run_id
    return SlotModel(
        version=version, run_id=run_id, dims_uri=dims_uri, promoted_at=datetime.now(UTC).isoformat()
    )


def move_champion(registry: ModelRegistry, version: str) -> str | None:
    previous = registry.alias_version(CHAMPION)
    if previous is not None and previous != version:
        registry.set_alias(PREVIOUS_CHAMPION, previous)
    registry.set_alias(CHAMPION, version)
    return previous


def promote(
    settings: Settings,
    decision: PromotionDecision,
    model: RegisteredModel,
    features: FeatureSet,
    strategy: str = "blue_green",
    canary_share: float = 0.1,
) -> ServingResult:
    """Deploy the gate's winner (blue-green or canary), or keep the champion serving."""
    if strategy not in STRATEGIES:
        raise PromotionFailed(
            f"unknown promotion strategy {strategy!r} (use {', '.join(STRATEGIES)})"
        )
    registry = ModelRegistry(settings)
    ensure_serve(settings)
    url = settings.serve_url
    requests = smoke_flights(settings.storage_root, settings.storage_options, features)
    state = load_state(settings)
    live = live_version(url)
    if state is None and live is not None:
        # A live application whose state was not saved here (e.g. a new storage root): adopt it,
        # unless this registry does not know its version; then it is replaced like a fresh start.
        try:
            state = initial(slot_model_for(settings, registry, live, features.dims_uri))
        except Exception:
            live = None
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
        new = slot_model_for(settings, registry, version, features.dims_uri)
        if live is None:
            # Nothing is live to protect: deploy the whole state, then check it.
            final = switch(stage_on_standby(state, new)) if state else initial(new)
            _apply_checked(settings, final, None, final.primary, requests, expected, version)
        else:
            staged = stage_on_standby(state, new)
            _apply_checked(settings, staged, state, staged.standby, requests, expected, version)
            final = start_canary(staged, canary_share) if strategy == "canary" else switch(staged)
            deploy_state(settings, final)
        save_state(settings, final)
        if final.canary:
            detail = f"version {version} is canary on {canary_share:.0%} of traffic; alias unmoved"
            moved = False
        else:
            previous = move_champion(registry, version)
            detail = (
                f"version {version} promoted ({strategy}); previous champion {previous or 'none'}"
            )
            moved = True
    else:
        version = decision.champion_version or model.version
        expected = offline_predictions(
            registry, version, features, requests, settings.storage_options
        )
        if state is None or state.primary_model.version != version:
            state = initial(slot_model_for(settings, registry, version, features.dims_uri))
        if live != version:
            _apply_checked(settings, state, None, state.primary, requests, expected, version)
        save_state(settings, state)
        final, moved = state, False
        detail = f"champion version {version} kept serving; challenger {model.version} not promoted"
    body = check_slot(url, final.primary, requests[:1], expected[:1], final.primary_model.version)
    return ServingResult(
        url=f"{url}/predict",
        app_name=settings.serve_app_name,
        model_version=final.primary_model.version,
        promoted=decision.promote and not final.canary,
        alias_moved=moved,
        sample_request=requests[0],
        sample_prediction={"version": body["version"], **body["predictions"][0]},
        detail=detail,
    )


def _apply_checked(
    settings: Settings,
    state: ServingState,
    previous: ServingState | None,
    slot: str,
    requests: list[dict[str, Any]],
    expected: np.ndarray,
    version: str,
) -> None:
    """Deploy a state and check one slot; on failure put the previous state back and raise."""
    from ray import serve

    try:
        deploy_state(settings, state)
        check_slot(settings.serve_url, slot, requests, expected, version)
    except Exception as exc:
        if previous is not None:
            try:
                deploy_state(settings, previous)
            except Exception as restore_exc:
                log.error("could not restore the previous serving state: %s", restore_exc)
        else:
            try:
                serve.delete(settings.serve_app_name)
            except Exception as delete_exc:
                log.error("could not remove the failed application: %s", delete_exc)
        reason = exc if isinstance(exc, PromotionFailed) else f"failed to deploy: {_one_line(exc)}"
        raise PromotionFailed(f"version {version} not promoted: {reason}") from None


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


def serve_champion(settings: Settings) -> ServingState:
    """Deploy the saved serving state, or the champion alias when there is none; check it."""
    registry = ModelRegistry(settings)
    ensure_serve(settings)
    state = load_state(settings)
    champion = registry.alias_version(CHAMPION)
    if champion is None:
        raise ServingStateError(f"no {CHAMPION} version of {settings.model_name} is registered")
    if state is None or state.primary_model.version != champion:
        features_uri = registry.version_tags(champion).get("features_uri", "")
        snapshot = features_uri.rstrip("/").rsplit("/", 1)[-1]
        dims = Storage(settings.storage_root, settings.storage_options).uri(
            "curated", "dims", snapshot
        )
        state = initial(slot_model_for(settings, registry, champion, dims))
    deploy_state(settings, state)
    save_state(settings, state)
    return state


def rollback_serving(settings: Settings) -> ServingState:
    """Put the previous champion back in front: traffic and alias, in one step."""
    state = load_state(settings)
    if state is None:
        raise ServingStateError("nothing has been served yet")
    if live_version(settings.serve_url) is None:
        raise ServingStateError(f"no serving application answers at {settings.serve_url}")
    back = rollback(state)
    deploy_state(settings, back)
    save_state(settings, back)
    move_champion(ModelRegistry(settings), back.primary_model.version)
    return back


def finish_canary_serving(settings: Settings, promote_it: bool) -> ServingState:
    """End a canary: promote it (switch traffic, move the alias) or abort it."""
    state = load_state(settings)
    if state is None:
        raise ServingStateError("nothing has been served yet")
    done = finish_canary(state, promote_it)
    deploy_state(settings, done)
    save_state(settings, done)
    if promote_it:
        move_champion(ModelRegistry(settings), done.primary_model.version)
    return done


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
    strategy: str = "blue_green",
    canary_share: float = 0.1,
) -> ServingResult:
    """Prefect wrapper: deploy and switch, or keep the champion serving; never retried blindly."""
    from prefect import get_run_logger

    result = promote(settings, decision, model, features, strategy, canary_share)
    get_run_logger().info("%s; serving at %s", result.detail, result.url)
    return result
