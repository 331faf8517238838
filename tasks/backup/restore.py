"""Restore: verify the manifest and every blob before writing anything, stage the files beside
the target and move them into place only when all of them are written."""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mlops.backups import (
    Manifest,
    RestoreResult,
    blob_rel,
    read_manifest,
    redact_uri,
    resolve_backup,
    sha256_bytes,
    verify_entries,
)
from mlops.errors import BackupError
from mlops.registry import CHAMPION
from mlops.storage import Storage
from tasks.backup.stores import (
    is_postgres,
    load_pg_dump,
    pg_user_tables,
    rewrite_artifact_locations,
)


def verify_backup(root: Storage, backup_id: str) -> Manifest:
    """Read and check every blob of a backup; raise naming the first bad file."""
    manifest = read_manifest(root, backup_id)

    def read_blob(sha: str) -> bytes | None:
        try:
            return root.read_bytes(blob_rel(sha))
        except FileNotFoundError:
            return None

    problems = verify_entries(manifest.files, read_blob)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BackupError(f"backup {backup_id} failed verification: {problems[0]}{more}")
    return manifest


def local_target(entry_path: str) -> str:
    """Where a snapshot file goes in a restored MLOPS_HOME."""
    if entry_path == "mlflow/mlflow.db":
        return "mlflow.db"
    if entry_path == "mlflow/mlflow.sql":
        return "mlflow.sql"
    if entry_path.startswith(("data/", "mlartifacts/")):
        return entry_path
    return posixpath.join("restored", entry_path)  # registry/serve/drill records


def check_target(
    target: Path,
    needed_bytes: int,
    *,
    force: bool,
    live_home: Path | None,
    keep_free_bytes: int = 0,
    disk_free: Callable[[str], int] = lambda p: shutil.disk_usage(p).free,
) -> None:
    """Refuse a target that is live, non-empty, unwritable or too small, before any write."""
    target = target.expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise BackupError(f"target {target} exists and is not a directory")
    is_live = live_home is not None and target.resolve() == live_home.resolve()
    if not force and is_live:
        raise BackupError(f"target {target} is the live MLOPS_HOME; pass --force to overwrite it")
    if not force and target.exists() and any(target.iterdir()):
        raise BackupError(f"target {target} is not empty; pass --force to overwrite it")
    anchor = target
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir() or not _can_write(anchor):
        raise BackupError(f"no permission to write under {anchor}")
    free = disk_free(str(anchor))
    if free - needed_bytes < keep_free_bytes:
        raise BackupError(
            f"not enough space under {anchor}: {needed_bytes} bytes needed"
            f"{f' plus {keep_free_bytes} kept free' if keep_free_bytes else ''}, {free} free"
        )


def _can_write(directory: Path) -> bool:
    """Really try (``os.access`` says yes to root even on a read-only file system)."""
    try:
        probe = tempfile.mkdtemp(prefix=".mlops-probe-", dir=directory)
    except OSError:
        return False
    os.rmdir(probe)
    return True


def restore(
    root: Storage,
    backup_id: str,
    target: Path,
    *,
    force: bool = False,
    live_home: Path | None = None,
    keep_free_bytes: int = 0,
    check: bool = True,
    tracking_store: str | None = None,
) -> RestoreResult:
    """Verify, stage beside the target, then move into place; finally open and check the store.

    A backup of a PostgreSQL store holds ``mlflow.sql``; with ``tracking_store`` (the URI of an
    empty PostgreSQL database) the dump is loaded there in one transaction before the files move
    into place, and the checks run against that database.
    """
    backup_id = resolve_backup(root, backup_id)
    manifest = verify_backup(root, backup_id)
    target = target.expanduser().absolute()
    check_target(
        target,
        manifest.total_bytes,
        force=force,
        live_home=live_home,
        keep_free_bytes=keep_free_bytes,
    )
    has_dump = any(f.path == "mlflow/mlflow.sql" for f in manifest.files)
    if tracking_store:
        if not has_dump:
            raise BackupError(f"backup {backup_id} holds no PostgreSQL dump to load")
        if not is_postgres(tracking_store):
            raise BackupError("--tracking-store must be a postgresql:// URI")
        if pg_user_tables(tracking_store):
            raise BackupError(
                f"database {redact_uri(tracking_store)} is not empty; restore into an empty one"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    stage_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.restore-", dir=target.parent))
    old_artifacts = manifest.sources.get("mlflow_artifact_root", "")
    try:
        for entry in manifest.files:
            data = root.read_bytes(blob_rel(entry.sha256))
            if sha256_bytes(data) != entry.sha256:  # changed since verification
                raise BackupError(f"backup {backup_id} failed verification: {entry.path} changed")
            out = stage_dir / local_target(entry.path)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
        db = stage_dir / "mlflow.db"
        if db.exists() and old_artifacts:
            rewrite_artifact_locations(str(db), old_artifacts, str(target / "mlartifacts"))
        if tracking_store:
            load_pg_dump(
                str(stage_dir / "mlflow.sql"), tracking_store, old_artifacts,
                str(target / "mlartifacts"),
            )  # fmt: skip
        (stage_dir / "restored" / "backup.json").parent.mkdir(parents=True, exist_ok=True)
        (stage_dir / "restored" / "backup.json").write_text(
            json.dumps({"backup_id": backup_id, "backup_root": root.root}, indent=2)
        )
        _move_into_place(stage_dir, target)
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)
    aliases: dict[str, str] = {}
    loaded = False
    detail = f"restored {len(manifest.files)} files ({manifest.total_bytes} bytes)"
    store = tracking_store or (
        f"sqlite:///{target / 'mlflow.db'}" if (target / "mlflow.db").exists() else None
    )
    if has_dump and not tracking_store:
        detail += "; mlflow.sql not loaded (pass --tracking-store postgresql://... to load it)"
    if check and store:
        aliases, loaded = check_restored(target, manifest, store)
        detail += f"; MLflow store opens, aliases {aliases or 'none'}"
        detail += "; champion loads" if loaded else ""
    return RestoreResult(
        backup_id, str(target), len(manifest.files), manifest.total_bytes, aliases, loaded, detail
    )


def _move_into_place(stage_dir: Path, target: Path) -> None:
    """Swap each restored top-level entry in; other entries (backups/, prefect/) stay."""
    if not target.exists() or not any(target.iterdir()):
        if target.exists():
            target.rmdir()
        os.replace(stage_dir, target)
        stage_dir.mkdir()  # the caller removes it
        return
    trash = Path(tempfile.mkdtemp(prefix=".restore-old-", dir=target))
    try:
        for entry in sorted(stage_dir.iterdir()):
            dest = target / entry.name
            if dest.exists():
                os.replace(dest, trash / entry.name)
            os.replace(entry, dest)
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def check_restored(target: Path, manifest: Manifest, store_uri: str) -> tuple[dict[str, str], bool]:
    """The restored store opens, its aliases equal the backed-up ones, the champion loads."""
    from mlflow.tracking import MlflowClient

    model_name = manifest.sources.get("model_name", "")
    expected = json.loads((target / "restored" / "registry" / "registry.json").read_text())
    want = next((m["aliases"] for m in expected["models"] if m["name"] == model_name), {})
    client = MlflowClient(store_uri, registry_uri=store_uri)
    have: dict[str, str] = {}
    for rm in client.search_registered_models():
        if rm.name == model_name:
            have = {a: str(v) for a, v in (rm.aliases or {}).items()}
    if have != want:
        raise BackupError(f"restored aliases {have} differ from the backup's {want}")
    loaded = False
    if CHAMPION in have:
        import mlflow
        import mlflow.xgboost

        mlflow.set_tracking_uri(store_uri)
        mlflow.set_registry_uri(store_uri)  # not the process default
        mlflow.xgboost.load_model(f"models:/{model_name}/{have[CHAMPION]}")
        loaded = True
    return have, loaded
