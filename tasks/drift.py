"""Drift: compare the champion's training data with a recent window of traffic.

The pure core scores each feature with the population stability index (PSI: quantile bins of
the reference for numeric features, one bin per code for categorical ones, missing values in a
bin of their own), a two-sample Kolmogorov-Smirnov test for numeric features, and compares the
predicted-positive rate. ``assess_drift`` turns the table into one verdict with its reason, and
``decide_alert`` applies the cooldown. The wrappers load the champion's reference snapshot (found
through its registry lineage), the current window (the inference log or a flights source, built
through the same feature code as training), emit ``mlops.drift.detected`` and keep the cooldown
state under the storage root.
"""

from __future__ import annotations

import datetime as dt
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mlops import lake
from mlops.dates import parse_date
from mlops.errors import UserError
from mlops.events import DEFAULT_RETRAIN_DAYS
from mlops.features import FEATURE_COLUMNS
from mlops.results import (
    AlertOutcome,
    ChampionReference,
    DriftCheck,
    DriftReport,
    FeatureDrift,
)
from mlops.settings import Settings
from mlops.storage import Storage
from tasks.common import stage

INFERENCE_LOG = "inference_log"  # the source name that means "what serving answered"
PREDICTION = "probability_late"  # the inference log's column; reference and raw data get scored
# Coded categories (CRC codes) and yes/no flags: PSI over their values, no KS.
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
REPORT_ARTIFACT_KEY = "drift-report"
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


# --- the pure core -------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class AlertRecord:
    """The last drift event sent for a model: kept under the storage root for the cooldown."""

    model_name: str
    champion_version: str
    event_id: str
    emitted_at: str  # ISO 8601, UTC
    window_start: str
    window_end: str


@dataclass(frozen=True)
class AlertPolicy:
    """When a drift verdict becomes an event, and what retraining window the event asks for."""

    cooldown_hours: float = 24.0
    retrain_days: int = DEFAULT_RETRAIN_DAYS
    emit: bool = True

    def __post_init__(self) -> None:
        if not self.cooldown_hours >= 0:
            raise UserError(f"cooldown_hours must be >= 0, got {self.cooldown_hours!r}")
        if self.retrain_days < 1:
            raise UserError(f"retrain_days must be >= 1, got {self.retrain_days!r}")


@dataclass(frozen=True)
class AlertDecision:
    action: str  # "emit", "suppress", "disabled" or "none"
    reason: str


def decide_alert(
    report: DriftReport,
    champion_version: str,
    last: AlertRecord | None,
    now: dt.datetime,
    policy: AlertPolicy,
) -> AlertDecision:
    """Emit on drift unless an alert for the same champion version went out within the cooldown.

    A new champion version always gets its own first alert.
    """
    cooldown_hours = policy.cooldown_hours
    if not report.drift_detected:
        return AlertDecision("none", f"no alert: verdict is {report.verdict}")
    if last is not None and last.champion_version == champion_version:
        sent = dt.datetime.fromisoformat(last.emitted_at)
        age_h = (now - sent).total_seconds() / 3600
        if age_h < cooldown_hours:
            until = (sent + dt.timedelta(hours=cooldown_hours)).isoformat(timespec="seconds")
            return AlertDecision(
                "suppress",
                f"suppressed: event {last.event_id} already reported drift for champion version "
                f"{champion_version} {age_h:.2f} h ago (window {last.window_start}.."
                f"{last.window_end}); cooldown is {cooldown_hours:g} h, until {until}",
            )
        why = f"the {cooldown_hours:g} h cooldown since event {last.event_id} has passed"
    elif last is not None:
        why = f"the champion changed from version {last.champion_version} to {champion_version}"
    else:
        why = f"first drift alert for champion version {champion_version}"
    if not policy.emit:
        return AlertDecision("disabled", f"not sent: emit is off (it would have been: {why})")
    return AlertDecision("emit", f"emitted: {why}")


def drift_markdown(check: DriftCheck, alert: AlertOutcome, policy: DriftPolicy) -> str:
    """The report artifact: verdict, alert outcome, figures, and a table row per feature."""
    r = check.report
    window = f"{check.window_start}..{check.window_end}" if check.window_start else "none (no data)"

    def rate(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    delta = r.positive_rate_delta
    lines = [
        f"# Drift check: **{r.verdict.upper().replace('_', ' ')}**, alert {alert.action}",
        "",
        "| figure | value |",
        "|---|---|",
        f"| model | {check.champion.model_name} version {check.champion.version} (champion) |",
        f"| reference | {check.champion.data_window}, {r.reference_rows} rows, "
        f"`{check.champion.features_uri}` |",
        f"| current | {check.source} {window}, {r.current_rows} rows |",
        f"| predicted-positive rate | {rate(r.reference_positive_rate)} -> "
        f"{rate(r.current_positive_rate)} (delta {'n/a' if delta is None else f'{delta:+.4f}'}, "
        f"limit {policy.positive_rate_delta:g}) |",
        f"| drifted features | {len(r.drifted_features)} of {len(r.features)} "
        f"(verdict at {policy.min_drifted_features}) |",
        f"| alert | {alert.action}"
        + (f", event `{alert.event_id}`" if alert.event_id else "")
        + " |",
        "",
        f"**Verdict:** {r.reason}",
        "",
        f"**Alert:** {alert.reason}",
        "",
    ]
    lines += [f"- {note}" for note in check.notes]
    lines += [
        "",
        f"Thresholds: PSI >= {policy.psi_threshold:g}; KS p < {policy.ks_alpha:g} with "
        f"D >= {policy.ks_min_statistic:g}; {policy.bins} reference quantile bins; not checked "
        f"(calendar position): {', '.join(r.excluded_features) or 'none'}.",
        "",
        "| feature | kind | PSI | KS D | KS p | missing ref | missing cur | drifted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in sorted(r.features, key=lambda f: -f.psi):
        ks_d = "" if f.ks_statistic is None else f"{f.ks_statistic:.3f}"
        ks_p = "" if f.ks_pvalue is None else f"{f.ks_pvalue:.1e}"
        lines.append(
            f"| {f.feature} | {f.kind} | {f.psi:.4f} | {ks_d} | {ks_p} | "
            f"{f.reference_missing:.1%} | {f.current_missing:.1%} | "
            f"{'**yes**: ' + f.reason if f.drifted else 'no'} |"
        )
    return "\n".join(lines)


# --- I/O -----------------------------------------------------------------------------------------


def champion_reference(settings: Settings) -> ChampionReference:
    """The champion version and its training snapshot, from the lineage register wrote."""
    from mlops.registry import CHAMPION, ModelRegistry

    champion = ModelRegistry(settings).champion()
    if champion is None:
        raise UserError(
            f"no champion: model {settings.model_name!r} has no {CHAMPION!r} alias; train first"
        )
    if not champion.lineage.features_uri:
        raise UserError(
            f"champion version {champion.version} of {settings.model_name!r} has no lineage "
            "(no features_uri tag on the version or its run): cannot find its training data"
        )
    return ChampionReference(
        model_name=settings.model_name,
        version=champion.version,
        run_id=champion.run_id,
        features_uri=champion.lineage.features_uri,
        data_window=champion.lineage.data_window,
    )


def score(booster: Any, frame: pd.DataFrame) -> np.ndarray:
    import xgboost as xgb

    if frame.empty:
        return np.empty(0)
    return booster.predict(xgb.DMatrix(frame.loc[:, list(FEATURE_COLUMNS)]))


def load_reference(settings: Settings, champion: ChampionReference, booster: Any) -> pd.DataFrame:
    """The champion's training snapshot, scored by the champion (for the positive rate)."""
    frame = lake.read_snapshot(champion.features_uri, settings.storage_options)
    frame[PREDICTION] = score(booster, frame)
    return frame


def _in_window(dates: pd.Series, window: tuple[dt.date, dt.date] | None) -> pd.Series:
    if window is None:
        return pd.Series(False, index=dates.index)
    return dates.between(window[0].isoformat(), window[1].isoformat())


def _latest(dates: pd.Series) -> dt.date | None:
    valid = dates.dropna()
    return dt.date.fromisoformat(str(valid.max())) if len(valid) else None


def load_source_window(
    settings: Settings,
    source: str,
    start: str | None,
    end: str | None,
    window_days: int,
    booster: Any,
) -> tuple[pd.DataFrame, tuple[dt.date, dt.date] | None, list[str]]:
    """Flights of the window from a source, featurized as the transform does, scored by the model.

    Cancelled and diverted flights stay in: they were scheduled traffic the model would answer.
    """
    from mlops.features import Lookups, build_features
    from tasks.ingest import load_source, partition_dates

    tables = load_source(source, settings.storage_options)
    dates = partition_dates(tables.flights)
    window = resolve_window(start, end, window_days, _latest(dates))
    flights = tables.flights.loc[_in_window(dates, window)]
    frame = build_features(flights, Lookups.from_frames(tables.weather, tables.planes))
    frame[PREDICTION] = score(booster, frame)
    notes = [f"{len(frame)} scheduled flights from {source}, featurized by build_features"]
    return frame.reset_index(drop=True), window, notes


def read_inference_log(
    storage_root: str, storage_options: dict[str, Any]
) -> tuple[pd.DataFrame, list[str]]:
    """Every retained inference log file: features, flight date, prediction and model version.

    Files being written (``.tmp-*``) are skipped; unreadable ones are skipped and noted.
    """
    import pyarrow.parquet as pq

    storage = Storage(storage_root, storage_options)
    columns = [*FEATURE_COLUMNS, "date", PREDICTION, "model_version"]
    frames, skipped = [], []
    for path in storage.find(lake.INFERENCE_LOG, ".parquet"):
        if posixpath.basename(path).startswith("."):
            continue
        try:
            frames.append(
                pq.read_table(path, columns=columns, filesystem=storage.pyarrow_fs()).to_pandas()
            )
        except Exception as exc:  # one bad file must not stop every hourly check
            skipped.append(f"{posixpath.basename(path)} ({type(exc).__name__})")
    notes = [f"skipped {len(skipped)} unreadable log file(s): {', '.join(skipped[:5])}"] * bool(
        skipped
    )
    if not frames:
        return pd.DataFrame(columns=columns), notes
    return pd.concat(frames, ignore_index=True), notes


def load_log_window(
    settings: Settings,
    champion_version: str,
    start: str | None,
    end: str | None,
    window_days: int,
) -> tuple[pd.DataFrame, tuple[dt.date, dt.date] | None, list[str]]:
    """Logged requests whose flights fall in the window (by scheduled flight date).

    Every logged row counts for the features; only rows the champion answered count for the
    predicted-positive rate (another version's predictions say nothing about the champion).
    """
    log, notes = read_inference_log(settings.storage_root, settings.storage_options)
    window = resolve_window(start, end, window_days, _latest(log["date"]))
    frame = log.loc[_in_window(log["date"], window)].reset_index(drop=True)
    mine = frame["model_version"].astype(str) == str(champion_version)
    frame[PREDICTION] = pd.to_numeric(frame[PREDICTION], errors="coerce").where(mine)
    notes.append(
        f"{len(frame)} logged rows in the window; {int(mine.sum())} answered by champion version "
        f"{champion_version} (the predicted-positive rate uses those)"
    )
    return frame, window, notes


def read_last_alert(storage: Storage, model_name: str) -> AlertRecord | None:
    rel = lake.drift_alert_path(model_name)
    if not storage.exists(rel):
        return None
    return AlertRecord(**storage.read_json(rel))


def write_last_alert(storage: Storage, record: AlertRecord) -> None:
    """Replace the cooldown record atomically (Storage writes aside and renames)."""
    storage.write_json(lake.drift_alert_path(record.model_name), record.__dict__)


def event_id_for(flow_run_id: str | None, champion: ChampionReference) -> uuid.UUID:
    """Stable per flow run: a retried emit resends the same event, which the server drops."""
    if not flow_run_id:
        return uuid.uuid4()
    return uuid.uuid5(uuid.NAMESPACE_URL, f"mlops.drift/{flow_run_id}/{champion.version}")


# --- Prefect wrappers ----------------------------------------------------------------------------


@stage("resolve_champion")
def resolve_champion(settings: Settings) -> ChampionReference:
    """Prefect wrapper: the champion version and where its training snapshot lives."""
    from prefect import get_run_logger

    champion = champion_reference(settings)
    get_run_logger().info(
        "champion %s version %s, trained on %s (%s)",
        champion.model_name,
        champion.version,
        champion.data_window,
        champion.features_uri,
    )
    return champion


@stage("check_drift")
def check_drift(
    settings: Settings,
    champion: ChampionReference,
    source: str,
    start: str | None,
    end: str | None,
    window_days: int,
    policy: DriftPolicy,
) -> DriftCheck:
    """Prefect wrapper: load the reference and the current window, and assess the drift."""
    from prefect import get_run_logger

    from mlops.registry import ModelRegistry

    resolve_window(start, end, window_days, None)  # bad dates fail before any data is read
    booster = ModelRegistry(settings).load_booster(champion.version)
    reference = load_reference(settings, champion, booster)
    if source == INFERENCE_LOG:
        current, window, notes = load_log_window(
            settings, champion.version, start, end, window_days
        )
    else:
        current, window, notes = load_source_window(
            settings, source, start, end, window_days, booster
        )
    report = assess_drift(reference, current, policy)
    check = DriftCheck(
        champion=champion,
        source=source,
        window_start=window[0].isoformat() if window else None,
        window_end=window[1].isoformat() if window else None,
        report=report,
        notes=tuple(notes),
    )
    get_run_logger().info(
        "drift check %s..%s: %s", check.window_start, check.window_end, report.reason
    )
    return check


@stage("emit_drift_alert")
def emit_drift_alert(
    settings: Settings,
    check: DriftCheck,
    policy: AlertPolicy,
    flow_run_id: str | None,
) -> AlertOutcome:
    """Prefect wrapper: send ``mlops.drift.detected`` unless the cooldown holds it back.

    The cooldown record is written only after the server accepted the event.
    """
    from prefect import get_run_logger

    from mlops.events import DriftAlert, emit_drift

    storage = Storage(settings.storage_root, settings.storage_options)
    champion = check.champion
    logger = get_run_logger()
    try:
        last = read_last_alert(storage, champion.model_name)
    except (ValueError, TypeError) as exc:  # a damaged record must not silence alerts forever
        logger.warning("cooldown record unreadable, treated as absent: %s", exc)
        last = None
    now = dt.datetime.now(dt.UTC)
    decision = decide_alert(check.report, champion.version, last, now, policy)
    if decision.action != "emit":
        action = {"suppress": "suppressed"}.get(decision.action, decision.action)
        logger.info("drift alert %s: %s", action, decision.reason)
        return AlertOutcome(action, decision.reason)
    assert check.window_start is not None and check.window_end is not None
    alert = DriftAlert(
        model_name=champion.model_name,
        window_start=dt.date.fromisoformat(check.window_start),
        window_end=dt.date.fromisoformat(check.window_end),
        source="drift-check",
        champion_version=champion.version,
        scores=check.report.scores(),
        reason=check.report.reason,
        alert_id=flow_run_id,
        retrain_days=policy.retrain_days,
    )
    event_id = emit_drift(alert, event_id_for(flow_run_id, champion))
    write_last_alert(
        storage,
        AlertRecord(
            model_name=champion.model_name,
            champion_version=champion.version,
            event_id=event_id,
            emitted_at=now.isoformat(),
            window_start=check.window_start,
            window_end=check.window_end,
        ),
    )
    logger.warning("drift alert emitted (event %s): %s", event_id, check.report.reason)
    return AlertOutcome("emitted", decision.reason, event_id)


@stage("publish_drift_report")
def publish_drift_report(check: DriftCheck, alert: AlertOutcome, policy: DriftPolicy) -> str:
    """Prefect wrapper: the report as a markdown artifact; returns its key."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        key=REPORT_ARTIFACT_KEY,
        markdown=drift_markdown(check, alert, policy),
        description=f"drift check: {check.report.verdict}, alert {alert.action}",
    )
    return REPORT_ARTIFACT_KEY
