"""Drift, the pure core: PSI, Kolmogorov-Smirnov and the predicted-positive rate, one verdict.

Each feature is scored with the population stability index (quantile bins of the reference for
numeric features, one bin per code for categorical ones, missing values in a bin of their own), a
two-sample Kolmogorov-Smirnov test for numeric features, and the predicted-positive rate is
compared. ``assess_drift`` turns the table into one verdict with its reason.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mlops.dates import parse_date
from mlops.errors import UserError
from mlops.features import FEATURE_COLUMNS
from mlops.results import (
    DriftReport,
    FeatureDrift,
)

PREDICTION = "probability_late"  # the inference log's column; reference and raw data get scored


CATEGORICAL_FEATURES = frozenset(
    {
        "carrier_code",
        "origin_code",
        "dest_code",
        "plane_type_code",
        "manufacturer_code",
        "weather_known",
        "plane_known",
    }
)
# Calendar position moves with every new day by construction: any later window "drifts" on it.
CALENDAR_FEATURES = ("month", "day", "day_of_year")


_PSI_FLOOR = 1e-4  # share given to an empty bin, so the log ratio stays finite


@dataclass(frozen=True)
class DriftPolicy:
    """When a window counts as drifted.

    A feature drifts when its PSI reaches ``psi_threshold``, or when its KS test rejects at
    ``ks_alpha`` with an effect of at least ``ks_min_statistic`` (on tens of thousands of rows a
    p-value alone flags differences too small to matter). The window drifts when at least
    ``min_drifted_features`` features drift, or when the predicted-positive rate (probability
    >= ``positive_threshold``) moves by ``positive_rate_delta`` or more.
    """

    psi_threshold: float = 0.2
    ks_alpha: float = 0.01
    ks_min_statistic: float = 0.1
    positive_rate_delta: float = 0.05
    min_drifted_features: int = 2
    min_rows: int = 200
    bins: int = 10
    positive_threshold: float = 0.5
    exclude: tuple[str, ...] = CALENDAR_FEATURES

    def __post_init__(self) -> None:
        rules = {
            "psi_threshold": (self.psi_threshold > 0, "> 0"),
            "ks_alpha": (0 < self.ks_alpha < 1, "in (0, 1)"),
            "ks_min_statistic": (0 <= self.ks_min_statistic <= 1, "in [0, 1]"),
            "positive_rate_delta": (0 < self.positive_rate_delta <= 1, "in (0, 1]"),
            "min_drifted_features": (self.min_drifted_features >= 1, ">= 1"),
            "min_rows": (self.min_rows >= 1, ">= 1"),
            "bins": (self.bins >= 2, ">= 2"),
            "positive_threshold": (0 < self.positive_threshold < 1, "in (0, 1)"),
        }
        problems = [
            f"{name} must be {rule}, got {getattr(self, name)!r}"
            for name, (ok, rule) in rules.items()
            if not ok
        ]
        unknown = sorted(set(self.exclude) - set(FEATURE_COLUMNS))
        if unknown:
            problems.append(f"exclude names unknown features: {', '.join(unknown)}")
        if problems:
            raise UserError("bad drift policy: " + "; ".join(problems))

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(c for c in FEATURE_COLUMNS if c not in self.exclude)


def _values(x: Any) -> np.ndarray:
    return pd.to_numeric(pd.Series(np.asarray(x).ravel()), errors="coerce").to_numpy("float64")


def bin_counts(
    reference: Any, current: Any, *, categorical: bool = False, bins: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Counts of both samples over bins fixed by the reference; the last bin holds missing values.

    Categorical features, and numeric ones with at most ``bins`` distinct reference values, get
    one bin per reference value plus one for values the reference never had. Other numeric
    features get reference quantile bins (open-ended, so no current value falls outside).
    """
    ref, cur = _values(reference), _values(current)
    ref_nan, cur_nan = np.isnan(ref), np.isnan(cur)
    r, c = ref[~ref_nan], cur[~cur_nan]
    seen = np.unique(r)
    if categorical or len(seen) <= bins:
        pos = np.clip(np.searchsorted(seen, c), 0, max(len(seen) - 1, 0))
        known = seen[pos] == c if len(seen) else np.zeros(len(c), dtype=bool)
        r_idx = np.searchsorted(seen, r)
        c_idx = np.where(known, pos, len(seen))
        width = len(seen) + 1
    else:
        edges = np.unique(np.quantile(r, np.linspace(0, 1, bins + 1)[1:-1]))
        r_idx = np.searchsorted(edges, r, side="right")
        c_idx = np.searchsorted(edges, c, side="right")
        width = len(edges) + 1
    r_counts = np.append(np.bincount(r_idx, minlength=width), ref_nan.sum())
    c_counts = np.append(np.bincount(c_idx, minlength=width), cur_nan.sum())
    return r_counts, c_counts


def population_stability_index(
    reference: Any, current: Any, *, categorical: bool = False, bins: int = 10
) -> float:
    """PSI = sum over bins of (current share - reference share) * ln(current / reference share).

    About 0 for the same distribution; 0.1-0.2 is a moderate shift, above 0.2 a large one.
    """
    r_counts, c_counts = bin_counts(reference, current, categorical=categorical, bins=bins)
    if r_counts.sum() == 0 or c_counts.sum() == 0:
        raise ValueError("PSI needs at least one row on each side")
    r = np.maximum(r_counts / r_counts.sum(), _PSI_FLOOR)
    c = np.maximum(c_counts / c_counts.sum(), _PSI_FLOOR)
    return float(np.sum((c - r) * np.log(c / r)))


def ks_test(reference: Any, current: Any) -> tuple[float, float] | None:
    """Two-sample KS statistic and p-value over the non-missing values; None if a side has none."""
    from scipy.stats import ks_2samp

    r, c = _values(reference), _values(current)
    r, c = r[~np.isnan(r)], c[~np.isnan(c)]
    if not len(r) or not len(c):
        return None
    # The exact distribution costs O(n*m); beyond small samples the asymptotic one is as good.
    method = "auto" if max(len(r), len(c)) <= 2000 else "asymp"
    result = ks_2samp(r, c, method=method)
    return float(result.statistic), float(result.pvalue)


def positive_rate(probabilities: Any, threshold: float = 0.5) -> float | None:
    """Share of predictions at or above ``threshold`` (missing ones ignored); None if none."""
    p = _values(probabilities)
    p = p[~np.isnan(p)]
    return float(np.mean(p >= threshold)) if len(p) else None


def _missing_share(x: np.ndarray) -> float:
    return float(np.isnan(x).mean()) if len(x) else 0.0


def feature_drift(name: str, reference: Any, current: Any, policy: DriftPolicy) -> FeatureDrift:
    """PSI (and KS for numeric features) of one feature, judged against the policy."""
    ref, cur = _values(reference), _values(current)
    categorical = name in CATEGORICAL_FEATURES
    psi = population_stability_index(ref, cur, categorical=categorical, bins=policy.bins)
    ks = None if categorical else ks_test(ref, cur)
    reasons = []
    if psi >= policy.psi_threshold:
        reasons.append(f"PSI {psi:.3f} >= {policy.psi_threshold:g}")
    if ks is not None and ks[1] < policy.ks_alpha and ks[0] >= policy.ks_min_statistic:
        reasons.append(f"KS D={ks[0]:.3f} >= {policy.ks_min_statistic:g} (p={ks[1]:.1e})")
    return FeatureDrift(
        feature=name,
        kind="categorical" if categorical else "numeric",
        psi=psi,
        ks_statistic=None if ks is None else ks[0],
        ks_pvalue=None if ks is None else ks[1],
        reference_missing=_missing_share(ref),
        current_missing=_missing_share(cur),
        drifted=bool(reasons),
        reason="; ".join(reasons),
    )


def _listing(drifted: list[FeatureDrift], limit: int = 5) -> str:
    top = sorted(drifted, key=lambda f: -f.psi)
    names = ", ".join(f"{f.feature} (PSI {f.psi:.2f})" for f in top[:limit])
    return names + (f" and {len(top) - limit} more" if len(top) > limit else "")


def assess_drift(
    reference: pd.DataFrame, current: pd.DataFrame, policy: DriftPolicy
) -> DriftReport:
    """Compare two feature frames and give the verdict with its reason.

    Both frames hold the feature columns; a ``probability_late`` column on both adds the
    predicted-positive rate. Fewer than ``policy.min_rows`` current rows (an empty window
    included) give the verdict ``no_data``, never an error.
    """
    features = policy.features
    for side, frame in (("reference", reference), ("current", current)):
        absent = [c for c in features if c not in frame.columns]
        if absent:
            raise ValueError(f"{side} data lacks feature column(s): {', '.join(absent)}")

    def no_data(reason: str) -> DriftReport:
        return DriftReport(
            verdict="no_data",
            reason=reason,
            features=(),
            reference_rows=len(reference),
            current_rows=len(current),
            reference_positive_rate=None,
            current_positive_rate=None,
            positive_rate_drifted=False,
            excluded_features=tuple(policy.exclude),
        )

    if len(reference) == 0:
        return no_data("no data: the champion's reference snapshot has no rows")
    if len(current) < policy.min_rows:
        what = "no rows" if len(current) == 0 else f"only {len(current)} rows"
        return no_data(
            f"no data: {what} in the current window (min_rows={policy.min_rows}); nothing judged"
        )

    table = tuple(feature_drift(c, reference[c], current[c], policy) for c in features)
    ref_rate = cur_rate = None
    if PREDICTION in reference.columns and PREDICTION in current.columns:
        ref_rate = positive_rate(reference[PREDICTION], policy.positive_threshold)
        cur_rate = positive_rate(current[PREDICTION], policy.positive_threshold)
    rate_drifted = (
        ref_rate is not None
        and cur_rate is not None
        and abs(cur_rate - ref_rate) >= policy.positive_rate_delta
    )
    drifted = [f for f in table if f.drifted]
    features_drifted = len(drifted) >= policy.min_drifted_features
    parts = [
        f"{len(drifted)} of {len(table)} features drifted "
        f"(verdict at {policy.min_drifted_features})"
        + (f": {_listing(drifted)}" if drifted else "")
    ]
    if ref_rate is None or cur_rate is None:
        parts.append("predicted-positive rate not compared (no predictions on one side)")
    else:
        parts.append(
            f"predicted-positive rate {ref_rate:.3f} -> {cur_rate:.3f} "
            f"(delta {cur_rate - ref_rate:+.3f}, limit {policy.positive_rate_delta:g})"
        )
    verdict = "drift" if features_drifted or rate_drifted else "no_drift"
    return DriftReport(
        verdict=verdict,
        reason=f"{verdict.replace('_', ' ')}: " + "; ".join(parts),
        features=table,
        reference_rows=len(reference),
        current_rows=len(current),
        reference_positive_rate=ref_rate,
        current_positive_rate=cur_rate,
        positive_rate_drifted=rate_drifted,
        excluded_features=tuple(policy.exclude),
    )


def resolve_window(
    start: str | None, end: str | None, window_days: int, latest: dt.date | None
) -> tuple[dt.date, dt.date] | None:
    """The inclusive window to check.

    Both ends given: that window. One end: ``window_days`` days from or to it. Neither: the
    ``window_days`` days ending at ``latest`` (the newest data); None when there is no data.
    """
    if window_days < 1:
        raise UserError(f"window_days must be >= 1, got {window_days}")
    span = dt.timedelta(days=window_days - 1)
    lo = parse_date(start, "start") if start else None
    hi = parse_date(end, "end") if end else None
    if lo and hi:
        if hi < lo:
            raise UserError(f"empty drift window: end {hi} is before start {lo}")
        return lo, hi
    if hi:
        return hi - span, hi
    if lo:
        return lo, lo + span
    return None if latest is None else (latest - span, latest)
