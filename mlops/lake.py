"""The lake's layout: every path under the storage root, and the readers of splits and snapshots.

Paths are relative to the storage root (``Storage(root).uri(rel)`` makes them absolute). Raw
partitions are never modified; feature snapshots and their lookups are published once, under an
id that hashes their inputs, so a path names one immutable thing.
"""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from mlops.features import Lookups
    from mlops.results import FeatureSet
    from mlops.storage import Storage

RAW = "raw"
QUARANTINE = "quarantine"
VALIDATION = "validation"
FEATURES = "features"
CURATED = "curated"
DIMS = posixpath.join(CURATED, "dims")
SERVING_STATE = "serving/state.json"
INFERENCE_LOG = "inference_log"
DRIFT_ALERTS = "drift/alerts"
SCRATCH = "_maintenance"
TUNE_RESULTS = "ray_results"  # Ray Tune trial directories
# The files of a snapshot's lookups (under ``dims_dir``).
WEATHER_DIM = "weather.parquet"
PLANES_DIM = "planes.parquet"
CARRIERS_DIM = "carriers.json"
# The data a backup copies besides the raw partitions: rebuildable, but slow to rebuild.
DATASET_DIRS = (CURATED, FEATURES)


def raw_dir(table: str) -> str:
    return posixpath.join(RAW, table)


def partition_path(table: str, date: str) -> str:
    """One day of a partitioned raw table (``flights``, ``weather``)."""
    return posixpath.join(RAW, table, f"date={date}", "data.parquet")


def planes_path() -> str:
    return posixpath.join(RAW, "planes", "data.parquet")


def quarantine_dir(table: str, date: str) -> str:
    return posixpath.join(QUARANTINE, table, f"date={date}")


def validation_report_path(start: str, end: str) -> str:
    return posixpath.join(VALIDATION, f"flights_{start}_{end}.json")


def snapshot_dir(snapshot_id: str) -> str:
    return posixpath.join(FEATURES, snapshot_id)


FEATURES_TMP = posixpath.join(FEATURES, "_tmp")


def snapshot_tmp_dir(name: str) -> str:
    return posixpath.join(FEATURES_TMP, name)


def split_dir(snapshot_rel: str, split: str) -> str:
    return posixpath.join(snapshot_rel, f"split={split}")


def dims_dir(snapshot_id: str) -> str:
    """The lookups (weather, planes, carriers) published with a feature snapshot."""
    return posixpath.join(DIMS, snapshot_id)


def dims_for_features(features_uri: str) -> str:
    """The lookups published with the snapshot at ``features_uri`` (same snapshot id)."""
    return dims_dir(posixpath.basename(features_uri.rstrip("/")))


def inference_log_file(day: str, name: str) -> str:
    return posixpath.join(INFERENCE_LOG, f"date={day}", f"{name}.parquet")


def drift_alert_path(model_name: str) -> str:
    return posixpath.join(DRIFT_ALERTS, f"{model_name}.json")


def load_lookups(dims_uri: str, storage_options: dict | None = None) -> Lookups:
    """Lookups from a feature snapshot's curated dimensions (``<dims_uri>/{weather,planes}``)."""
    from mlops.features import Lookups
    from mlops.storage import Storage

    root, leaf = posixpath.split(dims_uri.rstrip("/"))
    dims = Storage(root, storage_options or {})
    return Lookups.from_frames(
        dims.read_parquet(posixpath.join(leaf, WEATHER_DIM)).to_pandas(),
        dims.read_parquet(posixpath.join(leaf, PLANES_DIM)).to_pandas(),
    )


def read_carriers(dims_uri: str, storage_options: dict | None = None) -> list[str]:
    """The carrier codes seen in a snapshot's window, sorted ([] for a snapshot without them)."""
    import json

    from mlops.storage import Storage

    root, leaf = posixpath.split(dims_uri.rstrip("/"))
    dims = Storage(root, storage_options or {})
    path = posixpath.join(leaf, CARRIERS_DIM)
    return sorted(json.loads(dims.read_bytes(path))) if dims.exists(path) else []


def read_split(storage: Storage, features: FeatureSet, split: str) -> pd.DataFrame:
    """Load one split of a snapshot (feature columns and label) as pandas."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlops.features import LABEL

    rel = posixpath.relpath(features.split_uri(split), storage.root)
    files = storage.find(rel, ".parquet")
    cols = [*features.feature_columns, LABEL]
    tables = [pq.read_table(p, columns=cols, filesystem=storage.pyarrow_fs()) for p in files]
    return pa.concat_tables(tables).to_pandas()


def read_snapshot(features_uri: str, storage_options: dict[str, Any]) -> pd.DataFrame:
    """The feature columns of every split of a published feature snapshot (its whole window)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlops.errors import SourceError
    from mlops.features import FEATURE_COLUMNS
    from mlops.storage import Storage

    snapshot = Storage(features_uri, storage_options if features_uri.startswith("s3://") else {})
    if not snapshot.is_published(""):
        raise SourceError(f"feature snapshot {features_uri} is missing or was never published")
    files = [p for p in snapshot.find("", ".parquet") if not posixpath.basename(p).startswith(".")]
    tables = [
        pq.read_table(p, columns=list(FEATURE_COLUMNS), filesystem=snapshot.pyarrow_fs())
        for p in files
    ]
    if not tables:
        return pd.DataFrame(columns=list(FEATURE_COLUMNS))
    return pa.concat_tables(tables).to_pandas()
