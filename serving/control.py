"""The serving control plane: start Serve, deploy a serving state, wait until it routes, roll back.

The application (``serving/app.py``) has two model slots behind a router. A serving state
(``serving/state.py``) says which model each slot holds and how traffic splits; the functions here
apply one, check a slot over HTTP, and save the state under the storage root so that any later
process (the CLI, ``serve deploy``, a restore) can rebuild the same application.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np

from mlops.errors import PromotionFailed, one_line
from mlops.registry import CHAMPION, ModelRegistry
from mlops.settings import Settings
from mlops.storage import Storage
from serving.state import (
    ServingState,
    ServingStateError,
    SlotModel,
    finish_canary,
    initial,
    load_state,
    rollback,
    save_state,
)

SMOKE_TOLERANCE = 1e-5
log = logging.getLogger(__name__)


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


def deploy_state(settings: Settings, state: ServingState, timeout_s: float = 120.0) -> None:
    """Apply a state and return once the router routes by it.

    Unchanged slots are untouched and a traffic change restarts nothing: it is a ``user_config``
    change that Serve hands to the running router replicas a moment after ``serve.run``
    returns, so the live ``/version`` is read until every replica reports the new routing.
    """
    from ray import serve

    from serving.app import app_from_state

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


def apply_checked(
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
        reason = exc if isinstance(exc, PromotionFailed) else f"failed to deploy: {one_line(exc)}"
        raise PromotionFailed(f"version {version} not promoted: {reason}") from None


def serve_champion(settings: Settings) -> ServingState:
    """Deploy the saved serving state, or the champion alias when there is none; check it."""
    registry = ModelRegistry(settings)
    ensure_serve(settings)
    state = load_state(settings)
    champion = registry.champion()
    if champion is None:
        raise ServingStateError(f"no {CHAMPION} version of {settings.model_name} is registered")
    if state is None or state.primary_model.version != champion.version:
        dims_rel = champion.lineage.dims_rel
        if dims_rel is None:
            raise ServingStateError(
                f"{CHAMPION} version {champion.version} of {settings.model_name} has no lineage "
                "(no features_uri tag on the version or its run): cannot find its lookups"
            )
        dims = Storage(settings.storage_root, settings.storage_options).uri(dims_rel)
        state = initial(
            SlotModel(
                version=champion.version,
                run_id=champion.run_id,
                dims_uri=dims,
                promoted_at=datetime.now(UTC).isoformat(),
            )
        )
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
    ModelRegistry(settings).move_champion(back.primary_model.version)
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
        ModelRegistry(settings).move_champion(done.primary_model.version)
    return done
