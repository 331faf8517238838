"""Retry policy and device choice: transient errors retry, gates do not; GPUs only when real."""

from __future__ import annotations

import pytest
from prefect.states import Completed, Failed

from mlops.errors import PromotionFailed, SourceError, UserError, ValidationFailed
from tasks.common import retry_transient
from tasks.tune import choose_device


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
    ("use_gpu", "cluster_gpus", "expected"),
    [(True, 0, 0.0), (True, 1, 1.0), (True, 4, 1.0), (False, 4, 0.0), (True, 0.5, 0.0)],
)
def test_trials_ask_for_a_gpu_only_when_the_cluster_has_one(
    use_gpu: bool, cluster_gpus: float, expected: float
) -> None:
    from tasks.tune import TuneBudget, gpus_per_trial

    assert gpus_per_trial(TuneBudget(use_gpu=use_gpu), cluster_gpus) == expected
