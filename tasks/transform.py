"""Transform on Ray Data: join flights with weather and planes, build features, split by time.

The flights partitions stream through ``map_batches`` straight into Parquet. Each block reads its
own daily flights and weather partitions and joins them with the small planes table, so neither the
driver nor any task holds more than one block of the window: driver memory stays flat as the data
grows. The output directory is written aside and published with a ``_SUCCESS`` marker, so it is
never half visible.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa

from mlops.features import (
    FEATURE_COLUMNS,
    LABEL,
    SPLITS,
    Lookups,
    assign_split,
    build_features,
    prepare_planes,
    prepare_weather,
    split_bounds,
)
from mlops.fingerprint import code_version, fingerprint
from mlops.lake import (
    CARRIERS_DIM,
    PLANES_DIM,
    WEATHER_DIM,
    dims_dir,
    partition_path,
    planes_path,
    raw_dir,
    snapshot_dir,
    snapshot_tmp_dir,
    split_dir,
)
from mlops.results import FeatureSet, ValidationReport
from mlops.schema import RAW_COLUMNS, WEATHER_COLUMNS, WEATHER_KEY
from mlops.settings import Settings
from mlops.storage import Storage
from tasks.common import stage

READ_COLUMNS = list(RAW_COLUMNS["flights"])


@dataclass(frozen=True)
class TransformConfig:
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    partitions_per_block: int = 32
    concurrency: int | None = None
    op_resource_reservation: bool = False


def featurize_partitions(
    batch: dict[str, Any],
    storage: Storage,
    planes: pd.DataFrame,
    bounds: dict[str, tuple[str, str]],
) -> pd.DataFrame:
    """One Ray Data block: read its daily partitions, join, featurize, label and split.

    The weather lookups are built from the block's own dates only: a flight is joined with the
    weather of its own date, so this equals a join against the whole window's weather.
    Rows without a label (cancelled or diverted flights) are dropped here, on purpose.
    """
    import pyarrow.parquet as pq

    fs = storage.pyarrow_fs()
    tables = [pq.read_table(path, columns=READ_COLUMNS, filesystem=fs) for path in batch["path"]]
    flights = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    weather = read_weather(storage, [p for p in batch["weather"] if p])
    out = build_features(flights, Lookups.from_frames(weather, planes))
    out["split"] = assign_split(out["date"], bounds)
    out = out[out[LABEL].notna() & out["split"].notna()]
    return out.reset_index(drop=True)


WEATHER_READ_COLUMNS = [*WEATHER_KEY, *WEATHER_COLUMNS]


def read_weather(storage: Storage, paths: list[str], pool: Any = None) -> pd.DataFrame:
    """Weather partitions (full paths) as one frame ready for joining; empty when none."""
    import pyarrow.parquet as pq

    fs = storage.pyarrow_fs()

    def read(path: str) -> pa.Table:
        return pq.read_table(path, columns=WEATHER_READ_COLUMNS, filesystem=fs)

    tables = list(pool.map(read, paths) if pool else map(read, paths))
    if not tables:
        return prepare_weather(pd.DataFrame(columns=WEATHER_READ_COLUMNS))
    return prepare_weather(pa.concat_tables(tables, promote_options="permissive").to_pandas())


def weather_paths(storage: Storage, dates: tuple[str, ...]) -> list[str]:
    """Full path of each date's weather partition, "" where there is none (one listing)."""
    present = set(storage.ls_dirs(raw_dir("weather")))
    return [
        storage.path(partition_path("weather", d)) if f"date={d}" in present else "" for d in dates
    ]


def write_weather_dimension(storage: Storage, paths: list[str], rel: str, chunk: int = 256) -> None:
    """The window's weather, deduplicated for joining, as one Parquet file at ``rel``.

    Read and written a chunk of daily partitions at a time, so the driver holds one chunk of
    weather, never the window's. Each date is one file, so deduplicating per chunk is exact.
    """
    import pyarrow.parquet as pq

    paths = [p for p in paths if p]
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)] or [[]]
    buf = io.BytesIO()
    writer: Any = None
    with ThreadPoolExecutor(max_workers=4) as pool:  # small reads: overlap their latency
        for part in chunks:
            frame = read_weather(storage, part, pool)
            table = pa.Table.from_pandas(
                frame, schema=writer.schema if writer else None, preserve_index=False
            )
            if writer is None:
                writer = pq.ParquetWriter(buf, table.schema, compression="zstd")
            writer.write_table(table)
    writer.close()
    storage.write_bytes(rel, buf.getvalue())


def load_planes(storage: Storage) -> pd.DataFrame:
    """The planes table, deduplicated for joining."""
    return prepare_planes(storage.read_parquet(planes_path()).to_pandas())


def snapshot_hash(storage: Storage, rel: str) -> str:
    """sha256 over the content of every Parquet file of a feature snapshot, name-independent."""
    digests = sorted(file_digest(storage, p) for p in storage.find(rel, ".parquet"))
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


def file_digest(storage: Storage, path: str, chunk: int = 8 << 20) -> str:
    """sha256 of one file, read in chunks (a feature file grows with the block size)."""
    digest = hashlib.sha256()
    with storage.fs.open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def split_rows(storage: Storage, rel: str) -> dict[str, int]:
    import pyarrow.parquet as pq

    rows = {}
    for split in SPLITS:
        files = storage.find(split_dir(rel, split), ".parquet")
        rows[split] = sum(pq.read_metadata(storage.fs.open(p, "rb")).num_rows for p in files)
    return rows


def build_feature_snapshot(
    report: ValidationReport, storage: Storage, cfg: TransformConfig
) -> FeatureSet:
    """Run the Ray Data pipeline over the accepted partitions and publish the snapshot."""
    import ray

    dates = report.accepted_dates
    bounds = split_bounds(dates, cfg.split_fractions)
    snapshot_id = fingerprint(report.fingerprint, cfg, code_version())
    final_rel = snapshot_dir(snapshot_id)
    dims_rel = dims_dir(snapshot_id)

    weather = weather_paths(storage, dates)
    planes = load_planes(storage)
    # The weather dimension (for serving) is written by a Ray task while Ray Data runs: off the
    # driver, and overlapping the flights instead of preceding them.
    weather_dim = ray.remote(num_cpus=1, max_retries=2)(write_weather_dimension).remote(
        storage, weather, posixpath.join(dims_rel, WEATHER_DIM)
    )
    storage.write_json(posixpath.join(dims_rel, CARRIERS_DIM), list(report.carriers))
    storage.write_parquet(
        posixpath.join(dims_rel, PLANES_DIM),
        pa.Table.from_pandas(planes, preserve_index=False),
    )

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Ray Data reserves a share of CPUs and memory per operator by default. The plan here is one
    # fused read-featurize-write operator, and on 2 CPUs the reservation only held CPUs back:
    # the full year took 2.2-3.0 s with it, 1.6-1.9 s without (benchmarks/README.md, scale).
    ctx.op_resource_reservation_enabled = cfg.op_resource_reservation
    # One item per daily partition, grouped into blocks: each task reads its partitions itself
    # (no footer-scanning actors, which cost a worker process per file group on small nodes).
    paths = [
        {"path": storage.path(partition_path("flights", d)), "weather": w}
        for d, w in zip(dates, weather, strict=True)
    ]
    blocks = max(1, -(-len(paths) // cfg.partitions_per_block))
    ds = ray.data.from_items(paths, override_num_blocks=blocks)
    ds = ds.map_batches(
        featurize_partitions,
        batch_format="numpy",
        batch_size=None,
        concurrency=cfg.concurrency,
        fn_kwargs={
            "storage": storage,
            "planes": planes,
            "bounds": bounds,
        },
    )
    tmp_rel = snapshot_tmp_dir(f"{snapshot_id}-{uuid.uuid4().hex[:8]}")
    ds.write_parquet(
        storage.path(tmp_rel), filesystem=storage.pyarrow_fs(), partition_cols=["split"]
    )
    ray.get(weather_dim)
    rows = split_rows(storage, tmp_rel)
    empty = [s for s, n in rows.items() if n == 0]
    if empty:
        storage.delete(tmp_rel)
        raise ValueError(f"time split left no labelled rows in: {', '.join(empty)}")
    content_hash = snapshot_hash(storage, tmp_rel)
    storage.publish_dir(
        tmp_rel,
        final_rel,
        {"rows": rows, "bounds": bounds, "snapshot_hash": content_hash, "dates": list(dates)},
    )
    return FeatureSet(
        uri=storage.uri(final_rel),
        rows=rows,
        split_bounds=bounds,
        feature_columns=FEATURE_COLUMNS,
        snapshot_hash=content_hash,
        dims_uri=storage.uri(dims_rel),
    )


@stage(
    "build_feature_set",
    cache_on=lambda p: (p["settings"].storage_root, p["report"].fingerprint, p["config"]),
)
def build_feature_set(
    settings: Settings, report: ValidationReport, config: TransformConfig
) -> FeatureSet:
    """Prefect wrapper: build and publish the feature snapshot for the validated window."""
    from prefect import get_run_logger

    storage = Storage(settings.storage_root, settings.storage_options)
    features = build_feature_snapshot(report, storage, config)
    get_run_logger().info(
        "features %s: rows %s, windows %s", features.uri, features.rows, features.split_bounds
    )
    return features
