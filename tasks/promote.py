"""Promote: put the gate's winner on Ray Serve, smoke-check it, then move the ``champion`` alias.

The serving side (the two-slot application, deploying a state, checking a slot, rollback) lives
in ``serving/``; this stage decides what to deploy from the gate's outcome and checks it. Blue-green
(the default): the challenger is loaded into the standby slot beside the live champion, checked
over HTTP (``/healthz`` and a smoke set of real flights whose predictions must match the registry
model offline), then traffic switches and the alias moves. The previous champion stays warm in the
other slot for an instant rollback. Canary: a share of traffic goes to the standby slot until the
canary is promoted or aborted. A challenger that fails to load, check or answer never gets
traffic: the previous state is put back and the alias stays where it was.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mlops.errors import PromotionFailed, one_line
from mlops.lake import partition_path
from mlops.registry import ModelRegistry
from mlops.results import FeatureSet, PromotionDecision, RegisteredModel, ServingResult
from mlops.schema import to_requests
from mlops.settings import Settings
from mlops.storage import Storage
from serving.control import (
    apply_checked,
    check_slot,
    deploy_state,
    ensure_serve,
    live_version,
    slot_model_for,
)
from serving.state import initial, load_state, save_state, stage_on_standby, start_canary, switch
from tasks.common import stage

STRATEGIES = ("blue_green", "canary")


def smoke_flights(
    storage_root: str, storage_options: dict, features: FeatureSet, n: int = 8
) -> list[dict[str, Any]]:
    """Real flights from the test window, as serving requests."""
    storage = Storage(storage_root, storage_options)
    last_day = features.split_bounds["test"][1]
    frame = storage.read_parquet(partition_path("flights", last_day)).to_pandas()
    return to_requests(frame.head(n))


def offline_predictions(
    registry: ModelRegistry,
    version: str,
    features: FeatureSet,
    requests: list[dict[str, Any]],
    storage_options: dict,
) -> np.ndarray:
    """What the registry model gives for the requests outside Serve, through the same features."""
    import xgboost as xgb

    from mlops.features import FEATURE_COLUMNS, build_features
    from mlops.lake import load_lookups

    feats = build_features(pd.DataFrame(requests), load_lookups(features.dims_uri, storage_options))
    booster = registry.load_booster(version)
    return booster.predict(xgb.DMatrix(feats.loc[:, list(FEATURE_COLUMNS)]))


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
                f"{one_line(exc)}"
            ) from None
        new = slot_model_for(settings, registry, version, features.dims_uri)
        if live is None:
            # Nothing is live to protect: deploy the whole state, then check it.
            final = switch(stage_on_standby(state, new)) if state else initial(new)
            apply_checked(settings, final, None, final.primary, requests, expected, version)
        else:
            staged = stage_on_standby(state, new)
            apply_checked(settings, staged, state, staged.standby, requests, expected, version)
            final = start_canary(staged, canary_share) if strategy == "canary" else switch(staged)
            deploy_state(settings, final)
        save_state(settings, final)
        if final.canary:
            detail = f"version {version} is canary on {canary_share:.0%} of traffic; alias unmoved"
            moved = False
        else:
            previous = registry.move_champion(version)
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
            apply_checked(settings, state, None, state.primary, requests, expected, version)
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
