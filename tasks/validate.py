"""Validate: Great Expectations suites over the raw flights partitions of a window.

Hard expectations: schema (columns and types), key columns not null, ranges, a unique flight key
per date and row-count bounds per partition. A partition failing any of them is copied, with its
own GE result, to the quarantine zone; its raw copy is never touched. Cancelled or diverted flights
(no ``arr_delay``) are data, not errors: they are counted and later excluded from labels.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa

from mlops.errors import ValidationFailed
from mlops.fingerprint import fingerprint
from mlops.lake import partition_path, quarantine_dir, validation_report_path
from mlops.results import IngestResult, PartitionCheck, ValidationReport
from mlops.schema import (
    FLIGHT_KEY,
    FLOAT_LIKE,
    INTEGER_LIKE,
    KEY_COLUMNS,
    RAW_COLUMNS,
    STRING_LIKE,
)
from mlops.settings import Settings
from mlops.storage import Storage
from tasks.common import stage

RANGES: dict[str, dict[str, Any]] = {
    "month": {"min_value": 1, "max_value": 12},
    "day": {"min_value": 1, "max_value": 31},
    "sched_dep_time": {"min_value": 0, "max_value": 2400},
    "sched_arr_time": {"min_value": 0, "max_value": 2400},
    "dep_time": {"min_value": 0, "max_value": 2400},
    "arr_time": {"min_value": 0, "max_value": 2400},
    "distance": {"min_value": 0, "strict_min": True},
}
NUMERIC_TYPES = ["int8", "int16", "int32", "int64", "Int64", "float32", "float64", "Float64"]
STRING_TYPES = ["object", "str", "string", "StringDtype"]


@dataclass(frozen=True)
class ValidationConfig:
    max_quarantine_share: float = 0.05
    min_rows_per_partition: int = 100
    max_rows_per_partition: int = 5000


# pure pieces ---------------------------------------------------------------------------------


def schema_problems(schema: pa.Schema) -> list[str]:
    """Required columns missing or of the wrong type family, per pyarrow schema."""
    problems = []
    for col in RAW_COLUMNS["flights"]:
        if col not in schema.names:
            problems.append(f"missing column {col}")
            continue
        t = schema.field(col).type
        if col in INTEGER_LIKE or col in FLOAT_LIKE:
            ok = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)
        else:
            ok = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
        if not ok:
            problems.append(f"column {col} has type {t}")
    return problems


def _ge_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A validation view: string columns as object (GE 1.x types pandas 3 strings oddly)."""
    out = frame.copy()
    for col in out.columns:
        if pd.api.types.is_string_dtype(out[col]) and out[col].dtype != object:
            out[col] = out[col].astype("object")
    return out


def build_flights_suite() -> Any:
    """The hard expectations for flights partitions."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name="flights_raw")
    suite.add_expectation(
        gxe.ExpectTableColumnsToMatchSet(
            column_set=[*RAW_COLUMNS["flights"], "date"], exact_match=False
        )
    )
    for col in INTEGER_LIKE + FLOAT_LIKE:
        suite.add_expectation(
            gxe.ExpectColumnValuesToBeInTypeList(column=col, type_list=NUMERIC_TYPES)
        )
    for col in STRING_LIKE:
        suite.add_expectation(
            gxe.ExpectColumnValuesToBeInTypeList(column=col, type_list=STRING_TYPES)
        )
    for col in KEY_COLUMNS:
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=col))
    for col, bounds in RANGES.items():
        suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column=col, **bounds))
    suite.add_expectation(gxe.ExpectCompoundColumnsToBeUnique(column_list=list(FLIGHT_KEY)))
    return suite


def build_counts_suite(cfg: ValidationConfig) -> Any:
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name="flights_partition_rows")
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeBetween(
            column="rows",
            min_value=cfg.min_rows_per_partition,
            max_value=cfg.max_rows_per_partition,
        )
    )
    return suite


class GeRunner:
    """An ephemeral GE context with a pandas data source; validates frames against suites."""

    def __init__(self) -> None:
        import logging

        import great_expectations as gx

        logging.getLogger("great_expectations").setLevel(logging.WARNING)
        self._ctx = gx.get_context(mode="ephemeral")
        self._ctx.variables.progress_bars = {"globally": False}
        self._source = self._ctx.data_sources.add_pandas("mlops")
        self._n = 0

    def validate(self, frame: pd.DataFrame, suite: Any, index_cols: list[str]) -> dict[str, Any]:
        self._n += 1
        asset = self._source.add_dataframe_asset(f"frame_{self._n}")
        batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": _ge_frame(frame)}
        )
        result = batch.validate(
            suite,
            result_format={
                "result_format": "COMPLETE",
                "unexpected_index_column_names": index_cols,
                "partial_unexpected_count": 0,
            },
        )
        return result.to_json_dict()


def failed_dates_by_expectation(ge_result: dict[str, Any]) -> dict[str, set[str]]:
    """Map each date to the names of the hard expectations its rows failed."""
    failed: dict[str, set[str]] = defaultdict(set)
    for r in ge_result["results"]:
        if r["success"]:
            continue
        cfg = r["expectation_config"]
        kwargs = cfg.get("kwargs", {})
        label = cfg["type"] + (f"({kwargs['column']})" if "column" in kwargs else "")
        rows = r.get("result", {}).get("unexpected_index_list") or []
        for row in rows:
            if isinstance(row, dict) and "date" in row:
                failed[str(row["date"])].add(label)
    return failed


def summarize_expectations(*ge_results: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    out = []
    for res in ge_results:
        for r in res["results"]:
            cfg = r["expectation_config"]
            res_d = r.get("result", {})
            out.append(
                {
                    "expectation": cfg["type"],
                    "column": cfg.get("kwargs", {}).get("column")
                    or ",".join(cfg.get("kwargs", {}).get("column_list", []) or []),
                    "success": bool(r["success"]),
                    "unexpected_count": int(res_d.get("unexpected_count") or 0),
                }
            )
    return tuple(out)


# the stage -----------------------------------------------------------------------------------


def validate_window(
    ingest: IngestResult, storage: Storage, cfg: ValidationConfig
) -> ValidationReport:
    """Validate every ingested flights partition; quarantine the failures; write the report."""
    ge = GeRunner()
    suite = build_flights_suite()
    tables: dict[str, pa.Table] = {}
    schema_failed: dict[str, list[str]] = {}
    for day in ingest.partitions:
        table = storage.read_parquet(partition_path("flights", day))
        problems = schema_problems(table.schema)
        if problems:
            schema_failed[day] = problems
        tables[day] = table

    good = [d for d in ingest.partitions if d not in schema_failed]
    frames = []
    for day in good:
        frame = tables[day].to_pandas()
        frame["date"] = day
        frames.append(frame)
    combined = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    rows_by_date = {d: tables[d].num_rows for d in ingest.partitions}
    counts = pd.DataFrame({"date": list(rows_by_date), "rows": list(rows_by_date.values())})

    row_result = ge.validate(combined, suite, ["date"]) if frames else {"results": []}
    count_result = ge.validate(counts, build_counts_suite(cfg), ["date"])
    failures = failed_dates_by_expectation(row_result)
    for day, labels in failed_dates_by_expectation(count_result).items():
        failures[day] |= labels
    for day, problems in schema_failed.items():
        failures[day] |= {f"schema: {p}" for p in problems}

    cancelled = (
        combined.groupby("date")["arr_delay"].apply(lambda s: int(s.isna().sum())).to_dict()
        if frames
        else {}
    )
    checks = tuple(
        PartitionCheck(
            date=d,
            rows=rows_by_date[d],
            cancelled_or_diverted=int(cancelled.get(d, 0)),
            failed_expectations=tuple(sorted(failures.get(d, ()))),
        )
        for d in ingest.partitions
    )
    for check in checks:
        qdir = quarantine_dir("flights", check.date)
        if check.passed:
            storage.delete(qdir)  # a re-ingested, now valid partition leaves quarantine
            continue
        frame = tables[check.date].to_pandas()
        frame["date"] = check.date
        own = ge.validate(frame, suite, ["date"]) if check.date not in schema_failed else {}
        storage.copy(partition_path("flights", check.date), posixpath.join(qdir, "data.parquet"))
        storage.write_json(
            posixpath.join(qdir, "ge_result.json"),
            {"date": check.date, "failed": list(check.failed_expectations), "ge_result": own},
        )

    quarantined_rows = sum(c.rows for c in checks if not c.passed)
    report_rel = validation_report_path(ingest.start, ingest.end)
    report = ValidationReport(
        start=ingest.start,
        end=ingest.end,
        rows=sum(rows_by_date.values()),
        quarantined_rows=quarantined_rows,
        cancelled_or_diverted=sum(c.cancelled_or_diverted for c in checks if c.passed),
        max_quarantine_share=cfg.max_quarantine_share,
        partitions=checks,
        expectations=summarize_expectations(row_result, count_result),
        report_uri=storage.uri(report_rel),
        carriers=tuple(sorted(combined["carrier"].dropna().astype(str).unique())) if frames else (),
        fingerprint=fingerprint(ingest.fingerprint, [(c.date, c.passed) for c in checks], cfg),
    )
    storage.write_json(report_rel, report.to_dict())
    return report


def report_markdown(report: ValidationReport) -> str:
    lines = [
        f"# Validation of flights {report.start} .. {report.end}: **{report.verdict}**",
        "",
        "| figure | value |",
        "|---|---|",
        f"| rows | {report.rows} |",
        f"| partitions | {len(report.partitions)} |",
        f"| quarantined partitions | {len(report.quarantined_dates)} |",
        f"| quarantined rows | {report.quarantined_rows} ({report.quarantine_share:.2%}, "
        f"limit {report.max_quarantine_share:.2%}) |",
        f"| cancelled or diverted (no label, excluded) | {report.cancelled_or_diverted} |",
        "",
        "| expectation | column | success | unexpected |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {e['expectation']} | {e['column'] or ''} | {'yes' if e['success'] else '**no**'} | "
        f"{e['unexpected_count']} |"
        for e in report.expectations
    ]
    if report.quarantined_dates:
        lines += ["", "| quarantined date | rows | failed expectations |", "|---|---|---|"]
        lines += [
            f"| {c.date} | {c.rows} | {'; '.join(c.failed_expectations)} |"
            for c in report.partitions
            if not c.passed
        ]
    lines += ["", f"Full report: `{report.report_uri}`"]
    return "\n".join(lines)


@stage(
    "validate_partitions",
    cache_on=lambda p: (p["settings"].storage_root, p["ingest"].fingerprint, p["config"]),
)
def validate_partitions(
    settings: Settings, ingest: IngestResult, config: ValidationConfig
) -> ValidationReport:
    """Prefect wrapper: validate, publish the report as an artifact, stop on too much quarantine."""
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact

    storage = Storage(settings.storage_root, settings.storage_options)
    report = validate_window(ingest, storage, config)
    create_markdown_artifact(
        key="validation-report", markdown=report_markdown(report), description="GE validation"
    )
    logger = get_run_logger()
    logger.info(
        "validation %s: %d rows, %d quarantined in %d partitions, %d cancelled/diverted",
        report.verdict,
        report.rows,
        report.quarantined_rows,
        len(report.quarantined_dates),
        report.cancelled_or_diverted,
    )
    if report.verdict == "failed":
        raise ValidationFailed(
            f"{report.quarantine_share:.1%} of rows quarantined "
            f"(limit {report.max_quarantine_share:.1%}); see {report.report_uri}",
            report,
        )
    return report
