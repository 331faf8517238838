"""The promotion gate's decision table and its statistics."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.gate import Comparison, GatePolicy, decide_promotion, paired_bootstrap, roc_auc

POLICY = GatePolicy(margin=0.002)


def cmp(chal: float, champ: float, lo: float, hi: float) -> Comparison:
    return Comparison(chal, champ, chal - champ, (lo, hi))


@pytest.mark.parametrize(
    ("champion", "comparison", "promote", "reason"),
    [
        (None, None, True, "no champion yet"),
        ("3", cmp(0.70, 0.68, 0.010, 0.030), True, "better beyond"),
        ("3", cmp(0.66, 0.68, -0.030, -0.010), False, "worse"),
        ("3", cmp(0.68, 0.68, -0.004, 0.004), False, "tie"),
        ("3", cmp(0.6815, 0.68, -0.002, 0.005), False, "not better by the"),
        ("3", cmp(0.685, 0.68, -0.001, 0.011), False, "within noise"),
        ("3", cmp(0.683, 0.68, 0.001, 0.006), False, "within noise"),  # CI above 0, not margin
        ("7", None, False, "already the champion"),
    ],
)
def test_decision_table(
    champion: str | None, comparison: Comparison | None, promote: bool, reason: str
) -> None:
    challenger = "7"
    d = decide_promotion(challenger, 0.7, champion, comparison, POLICY)
    assert d.promote is promote
    assert reason in d.reason
    assert d.challenger_version == challenger and d.champion_version == champion
    if comparison is not None:
        assert d.ci == comparison.ci and d.delta == comparison.delta


def test_roc_auc_matches_known_values() -> None:
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert roc_auc(y, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert roc_auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5  # ties count half
    rows = roc_auc(np.stack([y, y]), np.stack([[0.1, 0.4, 0.35, 0.8], [0.4, 0.3, 0.2, 0.1]]))
    assert rows.tolist() == pytest.approx([0.75, 0.0])


def test_bootstrap_separates_a_clearly_better_model_from_noise() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 4000)
    noise = rng.normal(size=4000)
    good = y + noise * 0.8
    weak = y + noise * 0.8 + rng.normal(size=4000) * 2.0
    better = paired_bootstrap(y, good, weak, GatePolicy(n_bootstrap=200))
    assert better.delta > 0 and better.ci[0] > 0
    same = paired_bootstrap(
        y, good, good + 1e-9 * rng.normal(size=4000), GatePolicy(n_bootstrap=200)
    )
    assert same.ci[0] <= 0 <= same.ci[1]
    d = decide_promotion("2", better.challenger_score, "1", better, GatePolicy())
    assert d.promote
    d = decide_promotion("2", same.challenger_score, "1", same, GatePolicy())
    assert not d.promote


def test_gate_and_validation_errors_survive_pickling() -> None:
    """Ray and Prefect move exceptions between processes by pickling them."""
    import pickle

    from mlops.errors import PromotionFailed, ValidationFailed

    err = pickle.loads(pickle.dumps(ValidationFailed("too much quarantine", {"rows": 3})))
    assert str(err) == "too much quarantine" and err.report == {"rows": 3}
    assert str(pickle.loads(pickle.dumps(PromotionFailed("nope")))) == "nope"
