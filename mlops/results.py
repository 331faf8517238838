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
