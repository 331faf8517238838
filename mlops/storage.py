"""One small storage interface over a local directory or an s3:// prefix.

Writes are atomic: a local file is written beside its target and renamed into place; an S3 object
becomes visible only when its upload completes. Directories are published by writing a ``_SUCCESS``
marker last, so readers never see half-written output.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

SUCCESS_MARKER = "_SUCCESS"


@dataclass
class Storage:
    """A root URI plus the fsspec filesystem that serves it."""

    root: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = self.root.rstrip("/")
        self._fs, self._base = fsspec.core.url_to_fs(self.root, **self.storage_options)

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.root = state["root"]
        self.storage_options = state["storage_options"]
        self.__post_init__()

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._fs

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self._fs)

    def path(self, *parts: str) -> str:
        """Filesystem path (no scheme) of a location under the root."""
        return posixpath.join(self._base, *parts) if parts else self._base

    def uri(self, *parts: str) -> str:
        """Full URI of a location under the root, as other tools (MLflow, logs) want it."""
        return posixpath.join(self.root, *parts) if parts else self.root

    def pyarrow_fs(self) -> Any:
        """A pyarrow filesystem for Ray Data and pyarrow datasets."""
        from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

        if self.is_local:
            return LocalFileSystem()
        return PyFileSystem(FSSpecHandler(self._fs))

    # reads
    def exists(self, rel: str) -> bool:
        return bool(self._fs.exists(self.path(rel)))

    def ls_dirs(self, rel: str) -> list[str]:
        """Names of the sub-directories of ``rel`` (empty when it does not exist)."""
        target = self.path(rel)
        if not self._fs.exists(target):
            return []
        self._fs.invalidate_cache(target)
        entries = self._fs.ls(target, detail=True)
        return sorted(
            posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory"
        )

    def find(self, rel: str, suffix: str = "") -> list[str]:
        """All file paths under ``rel`` ending with ``suffix``, sorted."""
        target = self.path(rel)
        if not self._fs.exists(target):
            return []
        return sorted(p for p in self._fs.find(target) if p.endswith(suffix))

    def read_bytes(self, rel: str) -> bytes:
        with self._fs.open(self.path(rel), "rb") as f:
            return f.read()

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(rel), columns=columns, filesystem=self.pyarrow_fs())

    def size(self, rel: str) -> int:
        return int(self._fs.size(self.path(rel)))

    # writes
    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write ``data`` so that readers see either the old file or the whole new one."""
        target = self.path(rel)
        if self.is_local:
            parent = posixpath.dirname(target)
            os.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(target)}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            # An S3 PUT (or multipart upload) only becomes visible once it completes.
            with self._fs.open(target, "wb") as f:
                f.write(data)
        return target

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_bytes(
            rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        )

    def write_parquet(self, rel: str, table: pa.Table) -> str:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return self.write_bytes(rel, buf.getvalue())

    def copy(self, src_rel: str, dst_rel: str) -> str:
        """Copy one file; the copy appears atomically."""
        return self.write_bytes(dst_rel, self.read_bytes(src_rel))

    def delete(self, rel: str) -> None:
        target = self.path(rel)
        if self._fs.exists(target):
            self._fs.rm(target, recursive=True)

    def publish_dir(self, tmp_rel: str, final_rel: str, manifest: dict[str, Any]) -> None:
        """Move a fully written directory into place and mark it complete.

        Locally the rename is atomic. On S3 the move is a copy; readers trust a directory only
        once its ``_SUCCESS`` marker exists, and the marker is written last.
        """
        self.delete(final_rel)
        if self.is_local:
            os.makedirs(posixpath.dirname(self.path(final_rel)), exist_ok=True)
            os.replace(self.path(tmp_rel), self.path(final_rel))
        else:
            src_root = self.path(tmp_rel)
            for src in self._fs.find(src_root):  # object stores have no directories to move
                self._fs.copy(src, self.path(final_rel, posixpath.relpath(src, src_root)))
            self.delete(tmp_rel)
        self.write_json(posixpath.join(final_rel, SUCCESS_MARKER), manifest)

    def is_published(self, rel: str) -> bool:
        return self.exists(posixpath.join(rel, SUCCESS_MARKER))


def _protocols(fs: fsspec.AbstractFileSystem) -> Iterable[str]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)
