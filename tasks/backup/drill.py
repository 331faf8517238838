"""The restore drill: restore a backup into scratch and check the champion still predicts the same.

Each backup keeps the champion's predictions on a fixed set of real flights (``drill_reference``);
the drill restores the snapshot, loads the restored champion and compares.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlops.backups import (
    DRILL_TOLERANCE,
    REFERENCE,
    DrillResult,
    FileEntry,
    Manifest,
    blob_rel,
    read_manifest,
    resolve_backup,
)
from mlops.errors import BackupError, CheckFailed
from mlops.lake import dims_for_features
from mlops.registry import CHAMPION, load_champion
from mlops.results import OK, SKIPPED, CheckResult
from mlops.schema import drill_requests
from mlops.settings import Settings
from mlops.storage import Storage
from tasks.backup.restore import restore
from tasks.backup.stores import drop_database, is_postgres, scratch_database


def champion_predictions(
    tracking_uri: str,
    model_name: str,
    data: Storage,
    dims_rel: str | None,
    requests: list[dict[str, Any]],
) -> tuple[str, list[float]] | None:
    """(version, probabilities) of the champion on ``requests``, the way Serve computes them."""
    import pandas as pd
    import xgboost as xgb

    from mlops.features import FEATURE_COLUMNS, build_features
    from mlops.lake import load_lookups

    champion = load_champion(tracking_uri, model_name)
    if champion is None:
        return None
    if dims_rel is None:
        dims_rel = dims_for_features(champion.lineage.features_uri)
    lookups = load_lookups(data.uri(dims_rel), data.storage_options)
    feats = build_features(pd.DataFrame(requests), lookups)
    probs = champion.booster.predict(xgb.DMatrix(feats.loc[:, list(FEATURE_COLUMNS)]))
    return champion.version, [float(p) for p in probs]


def champion_identity(settings: Settings, registry: dict[str, Any]) -> dict[str, str] | None:
    """The champion's version and run id, from the registry state just read."""
    model = next((m for m in registry["models"] if m["name"] == settings.model_name), None)
    version = (model or {}).get("aliases", {}).get(CHAMPION)
    if not model or not version:
        return None
    mv = next(v for v in model["versions"] if v["version"] == version)
    return {"champion_version": version, "run_id": mv["run_id"]}


def drill_reference(
    settings: Settings, registry: dict[str, Any], previous: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Predictions of the current champion on the fixed flights, kept with the backup.

    They only change with the champion: the previous snapshot's reference is reused when it
    was taken of the same version, run and flights, so the model is loaded once per champion.
    """
    requests = drill_requests()
    champion = champion_identity(settings, registry)
    if champion is None:
        return {"champion_version": None, "requests": requests, "predictions": []}
    if (
        previous
        and previous.get("requests") == requests
        and all(previous.get(k) == v for k, v in champion.items())
    ):
        return previous
    data = Storage(settings.storage_root, settings.storage_options)
    got = champion_predictions(
        settings.mlflow_tracking_uri, settings.model_name, data, None, requests
    )
    if got is None:
        return {"champion_version": None, "requests": requests, "predictions": []}
    version, probs = got
    return {**champion, "champion_version": version, "requests": requests, "predictions": probs}


def previous_reference(root: Storage, previous: dict[str, FileEntry]) -> dict[str, Any] | None:
    entry = previous.get(REFERENCE)
    if entry is None:
        return None
    try:
        return json.loads(root.read_bytes(blob_rel(entry.sha256)))
    except (OSError, ValueError):
        return None


def restore_drill(
    root: Storage, backup_id: str, scratch: Path, server_store: str | None = None
) -> DrillResult:
    """Restore into a scratch location; the restored champion must predict as it did.

    A backup of a PostgreSQL store is loaded into a scratch database created beside
    ``server_store`` (the live backend store's URI: same server and credentials) and dropped
    afterwards.
    """
    backup_id = resolve_backup(root, backup_id)
    manifest = read_manifest(root, backup_id)
    scratch_db = None
    if any(f.path == "mlflow/mlflow.sql" for f in manifest.files):
        if not server_store or not is_postgres(server_store):
            raise BackupError(
                f"backup {backup_id} holds a PostgreSQL dump; the drill needs the PostgreSQL "
                "server to load it into (MLOPS_MLFLOW_BACKEND_STORE_URI)"
            )
        scratch_db = scratch_database(server_store, "drill")
    try:
        return _drill(root, backup_id, scratch, manifest, scratch_db)
    finally:
        if scratch_db:
            drop_database(scratch_db)


def _drill(
    root: Storage, backup_id: str, scratch: Path, manifest: Manifest, scratch_db: str | None
) -> DrillResult:
    result = restore(root, backup_id, scratch, force=True, tracking_store=scratch_db)
    reference = json.loads((scratch / "restored" / "drill" / "reference.json").read_text())
    version = reference.get("champion_version")
    if version is None:
        return DrillResult(
            backup_id, None, 0, None, True, f"{result.detail}; no champion was backed up"
        )
    got = champion_predictions(
        scratch_db or f"sqlite:///{scratch / 'mlflow.db'}",
        manifest.sources.get("model_name", ""),
        Storage(str(scratch / "data")),
        None,
        reference["requests"],
    )
    if got is None:
        return DrillResult(backup_id, version, 0, None, False, "restored store has no champion")
    restored_version, probs = got
    diff = max(
        (abs(a - b) for a, b in zip(probs, reference["predictions"], strict=True)), default=0
    )
    passed = restored_version == version and diff <= DRILL_TOLERANCE
    detail = (
        f"restored champion v{restored_version} on {len(probs)} fixed flights: "
        f"max |diff| {diff:.2e} vs before the backup"
    )
    return DrillResult(backup_id, version, len(probs), float(diff), passed, detail)


def drill_latest(
    root: Storage,
    backup_root: str,
    scratch: str | None,
    require_backup: bool,
    server_store: str | None,
) -> CheckResult:
    """The restore drill on the latest backup into a scratch directory, removed afterwards."""
    import shutil
    import tempfile

    from mlops.backups import list_backups

    try:
        ids = list_backups(root)
    except BackupError as exc:
        raise CheckFailed(str(exc)) from None
    if not ids:
        if require_backup:
            raise CheckFailed(f"no backup under {backup_root}")
        return CheckResult("validate_backups", SKIPPED, "no backups", f"none under {backup_root}")
    base = Path(scratch) if scratch else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mlops-drill-", dir=base))
    try:
        drill = restore_drill(root, ids[-1], work / "home", server_store=server_store)
    except BackupError as exc:
        raise CheckFailed(str(exc)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not drill.passed:
        raise CheckFailed(f"restore drill on {drill.backup_id} failed: {drill.detail}")
    return CheckResult("validate_backups", OK, f"drill on {drill.backup_id}", drill.detail)
