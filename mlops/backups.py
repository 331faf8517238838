"""The backup root's format: content-addressed blobs and one manifest per snapshot.

A backup root (a local path or ``s3://`` prefix, through :class:`mlops.storage.Storage`) holds::

    blobs/<sha256[:2]>/<sha256>        every distinct file content, stored once
    snapshots/<backup_id>/manifest.json

A snapshot exists only once its manifest exists: the blobs are written first, the manifest last.
Each manifest entry names the file's place in the snapshot (``data/...``, ``mlartifacts/...``,
``mlflow/mlflow.db``, ``registry/registry.json``, ``serve/serve.json``, ``drill/reference.json``),
its sha256, size, and where it came from. Here, in the core because the backup stage, the
maintenance cleanup and the CLI all read it: the typed results, snapshot ids, hashing, retention,
and opening, listing and reading a root. Pure functions and small reads; no Prefect.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mlops.errors import BackupError, one_line
from mlops.storage import Storage

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
        raise BackupError(f"backup root {root} is unreachable: {one_line(exc)}") from None
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
        raise BackupError(f"manifest of {backup_id} is corrupt: {one_line(exc)}") from None
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
