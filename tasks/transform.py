"""Transform on Ray Data: join flights with weather and planes, build features, split by time.

The flights partitions stream through ``map_batches`` (a broadcast join against the small weather
and planes dimensions) straight into Parquet; the driver never collects the flights. The output
directory is written aside and published with a ``_SUCCESS`` marker, so it is never half visible.
"""

from __future__ import annotations

import hashlib
import posixpath
import uuid
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
from mlops.results import FeatureSet, ValidationReport
from mlops.settings import Settings
from mlops.storage import Storage
from tasks.common import stage
from tasks.ingest import REQUIRED_COLUMNS, partition_path

READ_COLUMNS = list(REQUIRED_COLUMNS["flights"])


@dataclass(frozen=True)
class TransformConfig:
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    partitions_per_block: int = 32
    concurrency: int | None = None


def featurize_partitions(
    batch: dict[str, Any],
    storage: Storage,
    lookups: Lookups,
    bounds: dict[str, tuple[str, str]],
) -> pd.DataFrame:
    """One Ray Data block: read its daily partitions, join, featurize, label and split.

    Rows without a label (cancelled or diverted flights) are dropped here, on purpose.
    """
    import pyarrow.parquet as pq

    tables = [
        pq.read_table(path, columns=READ_COLUMNS, filesystem=storage.pyarrow_fs())
        for path in batch["path"]
    ]
    flights = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    out = build_features(flights, lookups)
    out["split"] = assign_split(out["date"], bounds)
    out = out[out[LABEL].notna() & out["split"].notna()]
    return out.reset_index(drop=True)


def load_dimensions(storage: Storage, dates: tuple[str, ...]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Weather for the window's dates and the planes table, deduplicated for joining."""
    weather_parts = [
        storage.read_parquet(partition_path("weather", d))
        for d in dates
        if storage.exists(partition_path("weather", d))
    ]
    if weather_parts:
        weather = pa.concat_tables(weather_parts, promote_options="permissive").to_pandas()
    else:
        weather = pd.DataFrame(columns=["origin", "year", "month", "day", "hour"])
    planes = storage.read_parquet(posixpath.join("raw", "planes", "data.parquet")).to_pandas()
    return prepare_weather(weather), prepare_planes(planes)


def snapshot_hash(storage: Storage, rel: str) -> str:
    """sha256 over the content of every Parquet file of a feature snapshot, name-independent."""
    digests = sorted(
        hashlib.sha256(storage.fs.cat_file(p)).hexdigest() for p in storage.find(rel, ".parquet")
    )
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


def split_rows(storage: Storage, rel: str) -> dict[str, int]:
    import pyarrow.parquet as pq

    rows = {}
    for split in SPLITS:
        files = storage.find(posixpath.join(rel, f"split={split}"), ".parquet")
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
    final_rel = posixpath.join("features", snapshot_id)
    dims_rel = posixpath.join("curated", "dims", snapshot_id)

    weather, planes = load_dimensions(storage, dates)
    storage.write_parquet(
        posixpath.join(dims_rel, "weather.parquet"),
        pa.Table.from_pandas(weather, preserve_index=False),
    )
    storage.write_json(posixpath.join(dims_rel, "carriers.json"), list(report.carriers))
    storage.write_parquet(
        posixpath.join(dims_rel, "planes.parquet"),
        pa.Table.from_pandas(planes, preserve_index=False),
    )

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # One item per daily partition, grouped into blocks: each task reads its partitions itself
    # (no footer-scanning actors, which cost a worker process per file group on small nodes).
    paths = [{"path": storage.path(partition_path("flights", d))} for d in dates]
    blocks = max(1, -(-len(paths) // cfg.partitions_per_block))
    ds = ray.data.from_items(paths, override_num_blocks=blocks)
    ds = ds.map_batches(
        featurize_partitions,
        batch_format="numpy",
        batch_size=None,
        concurrency=cfg.concurrency,
        fn_kwargs={
            "storage": storage,
            "lookups": Lookups.from_frames(weather, planes),
            "bounds": bounds,
        },
    )
    tmp_rel = posixpath.join("features", "_tmp", f"{snapshot_id}-{uuid.uuid4().hex[:8]}")
    ds.write_parquet(
        storage.path(tmp_rel), filesystem=storage.pyarrow_fs(), partition_cols=["split"]
    )
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


def read_split(storage: Storage, features: FeatureSet, split: str) -> pd.DataFrame:
    """Load one split of a snapshot (feature columns and label) as pandas."""
    import pyarrow.parquet as pq

    rel = posixpath.relpath(features.split_uri(split), storage.root)
    files = storage.find(rel, ".parquet")
    cols = [*features.feature_columns, LABEL]
    tables = [pq.read_table(p, columns=cols, filesystem=storage.pyarrow_fs()) for p in files]
    return pa.concat_tables(tables).to_pandas()


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
