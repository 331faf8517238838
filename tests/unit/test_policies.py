"""Retry policy and device choice: transient errors retry, gates do not; GPUs only when real."""

from __future__ import annotations

import pytest
from prefect.states import Completed, Failed

from mlops.devices import choose_device
from mlops.errors import PromotionFailed, SourceError, UserError, ValidationFailed
from tasks.common import retry_transient


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (OSError("connection reset"), True),
        (TimeoutError("slow S3"), True),
        (ConnectionError("refused"), True),
        (UserError("bad date"), False),
        (SourceError("missing table"), False),
        (ValidationFailed("too much quarantine", None), False),
        (PromotionFailed("health check failed"), False),
    ],
)
def test_only_transient_errors_are_retried(exc: Exception, retry: bool) -> None:
    assert retry_transient(None, None, Failed(data=exc)) is retry


def test_a_completed_state_is_not_retried() -> None:
    assert retry_transient(None, None, Completed(data=1)) is False


@pytest.mark.parametrize(
    ("gpus", "visible", "device", "note"),
    [
        ([0], True, "cuda", "training on CUDA"),
        ([0], False, "cpu", "falling back to CPU"),
        ([], True, "cpu", "no GPU assigned"),
        ([], False, "cpu", "no GPU assigned"),
    ],
)
def test_device_choice(gpus: list[int], visible: bool, device: str, note: str) -> None:
    got, why = choose_device(gpus, visible)
    assert got == device and note in why


@pytest.mark.parametrize(
    ("use_gpu", "per_trial", "cluster_gpus", "expected"),
    [
        (True, 1.0, 0, 0),
        (True, 1.0, 1, 1),
        (True, 1.0, 4, 4),
        (False, 1.0, 4, 0),
        (True, 1.0, 0.5, 0),
        (True, 0.5, 1, 2),
        (True, 0.0, 4, 0),
    ],
)
def test_gpu_slots_are_the_cluster_gpus_over_the_per_trial_share(
    use_gpu: bool, per_trial: float, cluster_gpus: float, expected: int
) -> None:
    from tasks.tune import TuneBudget, gpu_slots

    budget = TuneBudget(use_gpu=use_gpu, gpus_per_trial=per_trial)
    assert gpu_slots(budget, cluster_gpus) == expected


def test_gpu_trials_fill_the_gpu_slots_and_the_rest_run_on_cpu() -> None:
    """The searcher wrapper: GPU while a slot is free; a finished GPU trial frees its slot."""
    from ray.tune.search import Searcher

    from tasks.tune import ACCELERATOR, TuneBudget, accelerator_searcher, trial_resources

    class Counting(Searcher):
        def __init__(self) -> None:
            super().__init__(metric="m", mode="max")
            self.completed: list[str] = []

        def suggest(self, trial_id: str) -> dict:
            return {"eta": 0.1}

        def on_trial_complete(
            self, trial_id: str, result: dict | None = None, error: bool = False
        ) -> None:
            self.completed.append(trial_id)

    inner = Counting()
    wrapped = accelerator_searcher(inner, slots=1)
    first, second = wrapped.suggest("t1"), wrapped.suggest("t2")
    assert (first[ACCELERATOR], second[ACCELERATOR]) == ("gpu", "cpu")
    assert first["eta"] == 0.1
    wrapped.on_trial_complete("t1", {"m": 0.7})
    assert inner.completed == ["t1"]
    assert wrapped.suggest("t3")[ACCELERATOR] == "gpu"
    assert wrapped.get_state() == {"on_gpu": ["t3"]}  # Tune checkpoints the searcher chain
    wrapped.set_state({"on_gpu": []})
    assert wrapped.suggest("t4")[ACCELERATOR] == "gpu"
    budget = TuneBudget(cpus_per_trial=1, gpus_per_trial=0.5)
    assert trial_resources({ACCELERATOR: "gpu"}, budget).bundles == [{"CPU": 1.0, "GPU": 0.5}]
    assert trial_resources({ACCELERATOR: "cpu"}, budget).bundles == [{"CPU": 1.0}]
    assert accelerator_searcher(Counting(), slots=0).suggest("t")[ACCELERATOR] == "cpu"


def test_asha_grace_period_never_exceeds_the_round_budget() -> None:
    from tasks.tune import TuneBudget, asha_bounds

    assert asha_bounds(TuneBudget(max_rounds=300)) == (31, 3)
    assert asha_bounds(TuneBudget(max_rounds=10)) == (2, 2)  # `mlops run --max-rounds 10`
    assert asha_bounds(TuneBudget(max_rounds=5)) == (1, 1)
