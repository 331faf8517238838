"""The storage interface: atomic writes and published directories."""

from __future__ import annotations

import pickle
from pathlib import Path

import pyarrow as pa
import pytest

from mlops.storage import Storage


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    s = Storage(str(tmp_path))
    s.write_bytes("a/b/file.bin", b"one")
    s.write_bytes("a/b/file.bin", b"two")
    assert s.read_bytes("a/b/file.bin") == b"two"
    assert [p.name for p in (tmp_path / "a/b").iterdir()] == ["file.bin"]


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Storage(str(tmp_path))
    s.write_bytes("f.bin", b"old")

    def boom(*_a: object, **_k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        s.write_bytes("f.bin", b"new")
    assert s.read_bytes("f.bin") == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_publish_dir_marks_success_last(tmp_path: Path) -> None:
    s = Storage(str(tmp_path))
    s.write_parquet("tmp/x/part.parquet", pa.table({"a": [1, 2]}))
    assert not s.is_published("final/x")
    s.publish_dir("tmp/x", "final/x", {"rows": 2})
    assert s.is_published("final/x")
    assert s.read_parquet("final/x/part.parquet").num_rows == 2
    assert not s.exists("tmp/x")


def test_storage_pickles_for_ray_workers(tmp_path: Path) -> None:
    s = pickle.loads(pickle.dumps(Storage(str(tmp_path))))
    s.write_json("j.json", {"k": 1})
    assert s.read_json("j.json") == {"k": 1}
    assert s.uri("x", "y") == f"{tmp_path}/x/y"
