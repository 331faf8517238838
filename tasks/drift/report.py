"""The drift report as markdown: the verdict, the window, the per-feature table and the alert."""

from __future__ import annotations

from mlops.results import (
    AlertOutcome,
    DriftCheck,
)
from tasks.drift.stats import DriftPolicy

REPORT_ARTIFACT_KEY = "drift-report"


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
