"""What the serving application holds: two model slots, which one is primary, and any canary.

Blue-green and canary promotion, and rollback, are pure transitions of this state. The state is
saved (atomically) under the storage root (``mlops.lake.SERVING_STATE``), so ``mlops rollback``
and ``mlops serve`` can rebuild the application from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlops.settings import Settings

SLOTS = ("blue", "green")
MODEL_MAX_REPLICAS = 2  # per slot (the model deployments' autoscaling ceiling)


def serving_gpu_reserve(gpus_per_replica: float) -> float:
    """GPUs the serving application may hold at its autoscaling ceiling on a GPU cluster."""
    return len(SLOTS) * MODEL_MAX_REPLICAS * gpus_per_replica


class ServingStateError(ValueError):
    """A transition that makes no sense for the current state (e.g. rollback with nothing warm)."""


@dataclass(frozen=True)
class SlotModel:
    """The model version a slot serves and where its lookups live."""

    version: str
    run_id: str
    dims_uri: str
    promoted_at: str = ""


@dataclass(frozen=True)
class ServingState:
    slots: dict[str, SlotModel] = field(default_factory=dict)
    primary: str = "blue"
    canary: str | None = None
    canary_share: float = 0.0

    @property
    def standby(self) -> str:
        return next(s for s in SLOTS if s != self.primary)

    @property
    def primary_model(self) -> SlotModel:
        return self.slots[self.primary]

    def router_config(self) -> dict[str, Any]:
        return {"primary": self.primary, "canary": self.canary, "canary_share": self.canary_share}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServingState:
        slots = {k: SlotModel(**v) for k, v in d.get("slots", {}).items()}
        return cls(
            slots, d.get("primary", "blue"), d.get("canary"), float(d.get("canary_share", 0))
        )


def initial(model: SlotModel) -> ServingState:
    """First deployment: both slots hold the model (the standby is the rollback target later)."""
    return ServingState(slots={s: model for s in SLOTS}, primary="blue")


def stage_on_standby(state: ServingState, model: SlotModel) -> ServingState:
    """Load a challenger into the standby slot; traffic is unchanged."""
    return replace(
        state, slots={**state.slots, state.standby: model}, canary=None, canary_share=0.0
    )


def switch(state: ServingState) -> ServingState:
    """Blue-green switch: the standby becomes primary; the old primary stays warm."""
    return replace(state, primary=state.standby, canary=None, canary_share=0.0)


def start_canary(state: ServingState, share: float) -> ServingState:
    if not 0.0 < share < 1.0:
        raise ServingStateError(f"canary share must be between 0 and 1, got {share}")
    return replace(state, canary=state.standby, canary_share=share)


def finish_canary(state: ServingState, promote: bool) -> ServingState:
    if state.canary is None:
        raise ServingStateError("no canary is running")
    return switch(state) if promote else replace(state, canary=None, canary_share=0.0)


def rollback(state: ServingState) -> ServingState:
    """Put the warm previous champion back in front."""
    if state.slots[state.standby].version == state.primary_model.version:
        raise ServingStateError("nothing to roll back to: both slots serve the same version")
    return switch(state)


def load_state(settings: Settings) -> ServingState | None:
    """The state saved under the storage root, or None when nothing has been served there."""
    from mlops.lake import SERVING_STATE
    from mlops.storage import Storage

    storage = Storage(settings.storage_root, settings.storage_options)
    return (
        ServingState.from_dict(storage.read_json(SERVING_STATE))
        if storage.exists(SERVING_STATE)
        else None
    )


def save_state(settings: Settings, state: ServingState) -> None:
    """Replace the saved state (atomically: Storage writes aside and renames)."""
    from mlops.lake import SERVING_STATE
    from mlops.storage import Storage

    storage = Storage(settings.storage_root, settings.storage_options)
    storage.write_json(SERVING_STATE, state.to_dict())
