"""Gate: score challenger and champion on the same held-out test window and decide.

The challenger is promoted only if it beats the champion on ROC AUC by more than a margin, judged
by the lower bound of a paired bootstrap confidence interval on the difference. The first model
(no champion yet) is promoted. The decision and its reason are always recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlops.registry import ModelRegistry
from mlops.results import FeatureSet, PromotionDecision, RegisteredModel
from mlops.settings import Settings
from mlops.storage import Storage
from tasks.common import stage


@dataclass(frozen=True)
class GatePolicy:
    metric: str = "roc_auc"
    margin: float = 0.0
    confidence: float = 0.95
    n_bootstrap: int = 300
    seed: int = 0


@dataclass(frozen=True)
class Comparison:
    """Scores of both models on the same rows and the bootstrap interval of their difference."""

    challenger_score: float
    champion_score: float
    delta: float
    ci: tuple[float, float]


def roc_auc(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC (Mann-Whitney U with average ranks for ties); rows of 2-D inputs are samples."""
    from scipy.stats import rankdata

    y2 = np.atleast_2d(y).astype(bool)
    s2 = np.atleast_2d(scores)
    ranks = rankdata(s2, axis=1)
    n_pos = y2.sum(axis=1)
    n_neg = y2.shape[1] - n_pos
    u = (ranks * y2).sum(axis=1) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = u / (n_pos * n_neg)
    return auc if np.ndim(y) > 1 else auc[0]


def paired_bootstrap(
    y: np.ndarray, challenger: np.ndarray, champion: np.ndarray, policy: GatePolicy
) -> Comparison:
    """AUC of each model and a percentile CI of (challenger - champion) over paired resamples."""
    rng = np.random.default_rng(policy.seed)
    n = len(y)
    deltas = []
    for chunk in np.array_split(np.arange(policy.n_bootstrap), max(1, policy.n_bootstrap // 50)):
        idx = rng.integers(0, n, size=(len(chunk), n))
        deltas.append(roc_auc(y[idx], challenger[idx]) - roc_auc(y[idx], champion[idx]))
    d = np.concatenate(deltas)
    d = d[np.isfinite(d)]
    alpha = (1 - policy.confidence) / 2
    a, b = float(roc_auc(y, challenger)), float(roc_auc(y, champion))
    return Comparison(a, b, a - b, (float(np.quantile(d, alpha)), float(np.quantile(d, 1 - alpha))))


def decide_promotion(
    challenger_version: str,
    challenger_score: float,
    champion_version: str | None,
    comparison: Comparison | None,
    policy: GatePolicy,
) -> PromotionDecision:
    """The gate itself: pure, and it always says why."""

    def decision(promote: bool, reason: str) -> PromotionDecision:
        return PromotionDecision(
            promote=promote,
            reason=reason,
            metric=policy.metric,
            challenger_version=challenger_version,
            champion_version=champion_version,
            challenger_score=challenger_score,
            champion_score=comparison.champion_score if comparison else None,
            delta=comparison.delta if comparison else None,
            ci=comparison.ci if comparison else None,
            margin=policy.margin,
        )

    if champion_version is None:
        return decision(True, "no champion yet: the first model is promoted")
    if champion_version == challenger_version:
        return decision(False, f"version {challenger_version} is already the champion")
    assert comparison is not None
    lo, hi = comparison.ci
    pct = f"{policy.confidence:.0%}"
    detail = (
        f"{policy.metric} {comparison.challenger_score:.4f} vs champion "
        f"{comparison.champion_score:.4f}, delta {comparison.delta:+.4f}, "
        f"{pct} CI [{lo:+.4f}, {hi:+.4f}]"
    )
    if lo > policy.margin:
        return decision(
            True, f"challenger is better beyond the {policy.margin:+.4f} margin: {detail}"
        )
    if comparison.delta == 0:
        return decision(False, f"tie: {detail}")
    if hi < 0:
        return decision(False, f"challenger is worse: {detail}")
    if comparison.delta <= policy.margin:
        return decision(
            False, f"challenger is not better by the {policy.margin:+.4f} margin: {detail}"
        )
    return decision(False, f"difference is within noise (CI lower bound <= margin): {detail}")


def decision_markdown(d: PromotionDecision) -> str:
    verdict = "PROMOTE" if d.promote else "KEEP CHAMPION"
    ci = f"[{d.ci[0]:+.4f}, {d.ci[1]:+.4f}]" if d.ci else "n/a"
    champion = f"{d.champion_score:.4f}" if d.champion_score is not None else "n/a"
    return "\n".join(
        [
            f"# Promotion gate: **{verdict}**",
            "",
            "| figure | value |",
            "|---|---|",
            f"| challenger version | {d.challenger_version} |",
            f"| champion version | {d.champion_version or 'none'} |",
            f"| challenger {d.metric} | {d.challenger_score:.4f} |",
            f"| champion {d.metric} | {champion} |",
            f"| delta | {d.delta if d.delta is not None else 'n/a'} |",
            f"| CI | {ci} |",
            f"| margin | {d.margin} |",
            "",
            f"**Reason:** {d.reason}",
        ]
    )


def evaluate(
    settings: Settings, model: RegisteredModel, features: FeatureSet, policy: GatePolicy
) -> PromotionDecision:
    import xgboost as xgb

    from mlops.lake import read_split

    registry = ModelRegistry(settings)
    storage = Storage(settings.storage_root, settings.storage_options)
    test = read_split(storage, features, "test")
    cols = list(features.feature_columns)
    dtest = xgb.DMatrix(test[cols])
    y = test["label"].to_numpy().astype(int)
    p_chal = registry.load_booster(model.version).predict(dtest)
    chal_score = float(roc_auc(y, p_chal))
    incumbent = registry.champion()
    champion = incumbent.version if incumbent else None
    comparison = None
    if incumbent is not None and champion != model.version:
        p_champ = incumbent.booster.predict(dtest)
        comparison = paired_bootstrap(y, p_chal, p_champ, policy)
    d = decide_promotion(model.version, chal_score, champion, comparison, policy)
    registry.tag_version(
        model.version,
        {
            "gate_decision": "promote" if d.promote else "reject",
            "gate_reason": d.reason,
            f"gate_test_{policy.metric}": round(chal_score, 6),
            "gate_champion_version": champion or "none",
            "gate_test_window": "..".join(features.split_bounds["test"]),
        },
    )
    return d


@stage("evaluate_challenger")
def evaluate_challenger(
    settings: Settings, model: RegisteredModel, features: FeatureSet, policy: GatePolicy
) -> PromotionDecision:
    """Prefect wrapper: decide, and record the decision as an artifact and as MLflow tags."""
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact

    d = evaluate(settings, model, features, policy)
    create_markdown_artifact(
        key="promotion-decision", markdown=decision_markdown(d), description="promotion gate"
    )
    get_run_logger().info("gate: %s (%s)", "promote" if d.promote else "keep champion", d.reason)
    return d
