"""Typed results passed between stages. They carry URIs and figures, never DataFrames."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class IngestResult:
    source: str
    start: str
    end: str
    partitions: tuple[str, ...]
    rows: int
    raw_uri: str
    fingerprint: str


@dataclass(frozen=True)
class PartitionCheck:
    date: str
    rows: int
    cancelled_or_diverted: int
    failed_expectations: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failed_expectations


@dataclass(frozen=True)
class ValidationReport:
    start: str
    end: str
    rows: int
    quarantined_rows: int
    cancelled_or_diverted: int
    max_quarantine_share: float
    partitions: tuple[PartitionCheck, ...]
    expectations: tuple[dict[str, Any], ...]
    report_uri: str
    fingerprint: str
    carriers: tuple[str, ...] = ()

    @property
    def accepted_dates(self) -> tuple[str, ...]:
        return tuple(p.date for p in self.partitions if p.passed)

    @property
    def quarantined_dates(self) -> tuple[str, ...]:
        return tuple(p.date for p in self.partitions if not p.passed)

    @property
    def quarantine_share(self) -> float:
        return self.quarantined_rows / self.rows if self.rows else 0.0

    @property
    def verdict(self) -> str:
        if self.quarantine_share > self.max_quarantine_share:
            return "failed"
        return "passed_with_quarantine" if self.quarantined_rows else "passed"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            verdict=self.verdict,
            quarantine_share=self.quarantine_share,
            accepted_dates=list(self.accepted_dates),
            quarantined_dates=list(self.quarantined_dates),
        )
        return d


@dataclass(frozen=True)
class FeatureSet:
    uri: str
    rows: dict[str, int]
    split_bounds: dict[str, tuple[str, str]]
    feature_columns: tuple[str, ...]
    snapshot_hash: str
    dims_uri: str

    def split_uri(self, split: str) -> str:
        return f"{self.uri}/split={split}"


@dataclass(frozen=True)
class TuneResult:
    best_params: dict[str, Any]
    best_metric: float
    metric_name: str
    trial_count: int
    completed_trials: int
    best_checkpoint: str
    parent_run_id: str
    experiment_id: str
    device: str


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: str
    run_id: str
    model_uri: str


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str
    metric: str
    challenger_version: str
    champion_version: str | None
    challenger_score: float
    champion_score: float | None
    delta: float | None
    ci: tuple[float, float] | None
    margin: float


@dataclass(frozen=True)
class ServingResult:
    url: str
    app_name: str
    model_version: str
    promoted: bool
    alias_moved: bool
    sample_request: dict[str, Any]
    sample_prediction: dict[str, Any]
    detail: str = ""


@dataclass(frozen=True)
class PipelineSummary:
    ingest: IngestResult
    validation: ValidationReport
    features: FeatureSet
    tune: TuneResult
    model: RegisteredModel
    decision: PromotionDecision
    serving: ServingResult
    flow_run_id: str | None = None


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's drift figures: PSI always, KS for numeric features, missing shares."""

    feature: str
    kind: str  # "numeric" or "categorical"
    psi: float
    ks_statistic: float | None
    ks_pvalue: float | None
    reference_missing: float
    current_missing: float
    drifted: bool
    reason: str = ""


@dataclass(frozen=True)
class DriftReport:
    """Reference vs current window: the per-feature table and one verdict with its reason.

    ``verdict`` is ``drift``, ``no_drift`` or ``no_data`` (too few rows to judge).
    """

    verdict: str
    reason: str
    features: tuple[FeatureDrift, ...]
    reference_rows: int
    current_rows: int
    reference_positive_rate: float | None
    current_positive_rate: float | None
    positive_rate_drifted: bool
    excluded_features: tuple[str, ...] = ()

    @property
    def drift_detected(self) -> bool:
        return self.verdict == "drift"

    @property
    def drifted_features(self) -> tuple[str, ...]:
        return tuple(f.feature for f in self.features if f.drifted)

    @property
    def positive_rate_delta(self) -> float | None:
        if self.reference_positive_rate is None or self.current_positive_rate is None:
            return None
        return self.current_positive_rate - self.reference_positive_rate

    def scores(self) -> dict[str, float]:
        """Flat figures for an event payload: PSI and KS statistic per feature, rates, counts."""
        out: dict[str, float] = {
            "drifted_features": float(len(self.drifted_features)),
            "max_psi": max((f.psi for f in self.features), default=0.0),
        }
        for name, value in (
            ("positive_rate_reference", self.reference_positive_rate),
            ("positive_rate_current", self.current_positive_rate),
            ("positive_rate_delta", self.positive_rate_delta),
        ):
            if value is not None:
                out[name] = value
        for f in self.features:
            out[f"psi_{f.feature}"] = f.psi
            if f.ks_statistic is not None:
                out[f"ks_{f.feature}"] = f.ks_statistic
        return {k: round(float(v), 6) for k, v in out.items()}


@dataclass(frozen=True)
class ChampionReference:
    """The champion and, from its lineage, the feature snapshot it was trained on."""

    model_name: str
    version: str
    run_id: str
    features_uri: str
    data_window: str


@dataclass(frozen=True)
class DriftCheck:
    """What one drift check compared, over which window, and what it found."""

    champion: ChampionReference
    source: str
    window_start: str | None
    window_end: str | None
    report: DriftReport
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class AlertOutcome:
    """Whether the drift event went out: ``emitted``, ``suppressed``, ``disabled`` or ``none``."""

    action: str
    reason: str
    event_id: str | None = None


@dataclass(frozen=True)
class DriftCheckResult:
    check: DriftCheck
    alert: AlertOutcome
    artifact_key: str
    flow_run_id: str | None = None

    @property
    def drift_detected(self) -> bool:
        return self.check.report.drift_detected


# A maintenance check's outcome.
OK, FAILED, SKIPPED = "ok", "failed", "skipped"


@dataclass(frozen=True)
class CheckResult:
    """One row of the maintenance report: a check's status, headline figure and detail."""

    name: str
    status: str
    figure: str
    detail: str
