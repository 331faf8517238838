"""Taking a backup: collect the sources, store new contents once, write the manifest last; prune.

A file whose content is already stored is referenced, not copied; a source file whose size and
modification stamp match the previous snapshot's entry is not even read again.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mlops.backups import (
    BLOBS,
    READ_THREADS,
    REFERENCE,
    SKIP_PARTS,
    SNAPSHOTS,
    BackupResult,
    FileEntry,
    Manifest,
    PruneResult,
    RetentionPolicy,
    backup_id_for,
    blob_rel,
    known_blobs,
    list_backups,
    manifest_rel,
    open_root,
    read_manifest,
    redact_uri,
    reusable_hash,
    select_retained,
    sha256_bytes,
    stage_copy,
    unreferenced_blobs,
)
from mlops.lake import DATASET_DIRS
from mlops.settings import Settings
from mlops.storage import Storage
from tasks.backup.drill import drill_reference, previous_reference
from tasks.backup.registry_state import registry_state, registry_state_from_snapshot, serve_config
from tasks.backup.stores import dump_tracking_store


def _stamp(info: dict[str, Any]) -> str:
    for key in ("mtime", "LastModified", "ETag", "created"):
        if info.get(key):
            return str(info[key])
    return ""


@dataclass(frozen=True)
class _Source:
    path: str  # place in the snapshot
    storage: Storage | None  # None for generated content
    rel: str = ""
    data: bytes | None = None


def tree_sources(storage: Storage, prefix: str, dirs: Sequence[str] = ("",)) -> list[_Source]:
    out = []
    base = storage.path()
    for d in dirs:
        for full in storage.find(d):
            rel = posixpath.relpath(full, base)
            if any(part in SKIP_PARTS for part in rel.split("/")) or "/.tmp-" in f"/{rel}":
                continue
            out.append(_Source(posixpath.join(prefix, rel), storage, rel))
    return out


def take_backup(
    settings: Settings,
    backup_root: str,
    timestamp: datetime,
    *,
    include_datasets: bool = True,
    with_reference: bool = True,
) -> BackupResult:
    """Snapshot datasets, the MLflow store and artifacts, registry state and the Serve config."""
    import time

    t0 = time.monotonic()
    root = open_root(backup_root, settings.storage_options, create=True)
    backup_id = backup_id_for(timestamp)
    existing = list_backups(root)
    previous_id = max((b for b in existing if b < backup_id), default=None)
    previous: dict[str, FileEntry] = {}
    if previous_id:
        previous = {f.path: f for f in read_manifest(root, previous_id).files}
    known = known_blobs(root)

    with tempfile.TemporaryDirectory(prefix="mlops-backup-") as work:
        sources: list[_Source] = []
        if include_datasets:
            data = Storage(settings.storage_root, settings.storage_options)
            sources += tree_sources(data, "data", DATASET_DIRS)
        artifacts = Storage(settings.mlflow_artifact_root, settings.storage_options)
        sources += tree_sources(artifacts, "mlartifacts")
        dumped = dump_tracking_store(settings.mlflow_backend_store_uri, work)
        if dumped:
            sources.append(_Source(dumped[0], Storage(work), posixpath.basename(dumped[1])))
        if dumped and dumped[0] == "mlflow/mlflow.db":
            registry = registry_state_from_snapshot(dumped[1], settings.mlflow_tracking_uri)
        else:
            registry = registry_state(settings)
        generated = {
            "registry/registry.json": registry,
            "serve/serve.json": serve_config(settings, registry),
        }
        if with_reference:
            generated[REFERENCE] = drill_reference(
                settings, registry, previous_reference(root, previous)
            )
        for path, obj in generated.items():
            payload = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
            sources.append(_Source(path, None, data=payload))

        def store(src: _Source) -> tuple[FileEntry, int]:
            source_uri, stamp = "", ""
            if src.storage is not None:
                info = src.storage.fs.info(src.storage.path(src.rel))
                stamp = f"{info.get('size')}:{_stamp(info)}" if src.storage.root != work else ""
                source_uri = src.storage.uri(src.rel) if src.storage.root != work else ""
                sha = reusable_hash(previous, src.path, int(info["size"]), stamp, known)
                if sha is not None:
                    return FileEntry(src.path, sha, int(info["size"]), source_uri, stamp), 0
                if src.storage.is_local and root.is_local:  # stream, bounded memory
                    sha, size, tmp = stage_copy(src.storage.path(src.rel), root.path(BLOBS))
                    written = 0
                    try:
                        if sha not in known:
                            blob = root.path(blob_rel(sha))
                            os.makedirs(os.path.dirname(blob), exist_ok=True)
                            os.replace(tmp, blob)
                            written = size
                    finally:
                        if os.path.exists(tmp):
                            os.unlink(tmp)
                    return FileEntry(src.path, sha, size, source_uri, stamp), written
                data = src.storage.read_bytes(src.rel)
            else:
                data = src.data or b""
            sha = sha256_bytes(data)
            written = 0
            if sha not in known:
                root.write_bytes(blob_rel(sha), data)
                written = len(data)
            return FileEntry(src.path, sha, len(data), source_uri, stamp), written

        with ThreadPoolExecutor(READ_THREADS) as pool:
            stored = list(pool.map(store, sources))

    entries = tuple(sorted((e for e, _ in stored), key=lambda e: e.path))
    manifest = Manifest(
        backup_id=backup_id,
        created_at=timestamp.astimezone(UTC).isoformat() if timestamp.tzinfo else str(timestamp),
        files=entries,
        sources={
            "home": str(settings.home),
            "storage_root": settings.storage_root,
            "mlflow_tracking_uri": redact_uri(settings.mlflow_tracking_uri),
            "mlflow_backend_store": redact_uri(settings.mlflow_backend_store_uri),
            "mlflow_artifact_root": settings.mlflow_artifact_root,
            "model_name": settings.model_name,
        },
        previous=previous_id,
    )
    root.write_json(manifest_rel(backup_id), manifest.to_json())  # last: the backup now exists
    new = [(e, w) for e, w in stored if w]
    return BackupResult(
        backup_id=backup_id,
        backup_root=root.root,
        manifest_uri=root.uri(manifest_rel(backup_id)),
        files=len(entries),
        total_bytes=manifest.total_bytes,
        new_files=len(new),
        new_bytes=sum(w for _, w in new),
        reused_hashes=len(entries) - len(new),
        seconds=round(time.monotonic() - t0, 3),
    )


def prune(root: Storage, policy: RetentionPolicy) -> PruneResult:
    """Drop backups the policy does not keep, then blobs no kept backup references."""
    ids = list_backups(root)
    keep = select_retained(ids, policy)
    removed = [b for b in ids if b not in keep]
    for bid in removed:  # the manifest first: a half-pruned backup no longer exists
        root.delete(manifest_rel(bid))
        root.delete(posixpath.join(SNAPSHOTS, bid))
    kept_manifests = [read_manifest(root, b) for b in sorted(keep)]
    blobs = {posixpath.basename(p): p for p in root.find(BLOBS)}
    doomed = unreferenced_blobs(blobs, kept_manifests)
    freed = 0
    for sha in sorted(doomed):
        freed += int(root.fs.size(blobs[sha]))
        root.fs.rm(blobs[sha])
    return PruneResult(tuple(sorted(keep)), tuple(removed), len(doomed), freed)


def write_dr_pointer(
    dr_root: str, storage_options: dict[str, Any], result: BackupResult, manifest_sha: str
) -> str:
    """Record the latest good backup in the disaster-recovery checkpoint location."""
    dr = open_root(dr_root, storage_options, create=True)
    return dr.write_json(
        "latest.json",
        {
            "backup_root": result.backup_root,
            "backup_id": result.backup_id,
            "manifest_sha256": manifest_sha,
            "files": result.files,
            "total_bytes": result.total_bytes,
        },
    )
