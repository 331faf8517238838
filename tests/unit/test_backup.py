"""Pure cores of backup and restore: ids, dedup, retention, pruning, verification, targets."""

from __future__ import annotations

import hashlib
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mlops.backups import (
    FileEntry,
    Manifest,
    RetentionPolicy,
    backup_id_for,
    parse_backup_id,
    redact_uri,
    reusable_hash,
    select_retained,
    timestamp_for,
    unreferenced_blobs,
    verify_entries,
)
from mlops.errors import BackupError
from tasks.backup.restore import check_target, local_target
from tasks.backup.stores import rewrite_artifact_locations


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ids_daily(start: datetime, days: int, hour: int = 3) -> list[str]:
    return [backup_id_for(start + timedelta(days=i, hours=hour)) for i in range(days)]


def test_backup_id_round_trips_and_sorts_in_time_order() -> None:
    a = datetime(2013, 6, 1, 3, 0, 5, tzinfo=UTC)
    b = a + timedelta(hours=25)
    assert parse_backup_id(backup_id_for(a)) == a
    assert backup_id_for(a) < backup_id_for(b)
    with pytest.raises(BackupError, match="not a backup id"):
        parse_backup_id("yesterday")


def test_run_date_gives_the_timestamp_and_rejects_garbage() -> None:
    assert timestamp_for("2013-06-02") == datetime(2013, 6, 2, tzinfo=UTC)
    assert timestamp_for("2013-06-02T04:05:06+02:00").hour == 4
    with pytest.raises(BackupError, match="run_date"):
        timestamp_for("2013-13-45")


@pytest.mark.parametrize(
    ("stamp", "size", "known", "reused"),
    [
        ("1:100", 10, True, True),  # unchanged, blob present
        ("1:101", 10, True, False),  # modified since
        ("1:100", 11, True, False),  # size differs
        ("1:100", 10, False, False),  # blob pruned or lost: read and store again
        ("", 10, True, False),  # no stamp (generated content): always hash
    ],
)
def test_unchanged_files_reuse_their_hash_only_when_safe(
    stamp: str, size: int, known: bool, reused: bool
) -> None:
    h = sha(b"x")
    previous = {"data/a": FileEntry("data/a", h, 10, "/src/a", "1:100")}
    got = reusable_hash(previous, "data/a", size, stamp, {h} if known else set())
    assert (got == h) is reused


def test_retention_keeps_daily_then_weekly_and_always_the_newest() -> None:
    ids = ids_daily(datetime(2013, 5, 1, tzinfo=UTC), 60)  # 60 consecutive daily backups
    ids.append(backup_id_for(datetime(2013, 6, 29, 9, tzinfo=UTC)))  # a 2nd one the last day
    kept = select_retained(ids, RetentionPolicy(daily=7, weekly=4))
    newest = max(ids)
    assert newest in kept
    days = sorted({parse_backup_id(k).date() for k in kept})
    # the last 7 days, each by its newest backup, plus the newest of 4 ISO weeks
    last7 = sorted({parse_backup_id(i).date() for i in ids})[-7:]
    assert set(last7) <= set(days)
    weeks = {parse_backup_id(k).isocalendar()[:2] for k in kept}
    assert len(weeks) == 4
    assert len(kept) == len(last7) + len(weeks - {d.isocalendar()[:2] for d in last7})
    for k in kept:  # per kept day, only its newest backup
        same_day = [i for i in ids if parse_backup_id(i).date() == parse_backup_id(k).date()]
        assert k == max(same_day)


def test_retention_with_zero_keeps_only_the_newest() -> None:
    ids = ids_daily(datetime(2013, 1, 1, tzinfo=UTC), 10)
    assert select_retained(ids, RetentionPolicy(daily=0, weekly=0)) == {max(ids)}
    assert select_retained([], RetentionPolicy()) == set()


def manifest(bid: str, *contents: bytes) -> Manifest:
    files = tuple(FileEntry(f"f{i}", sha(c), len(c)) for i, c in enumerate(contents))
    return Manifest(bid, "t", files)


def test_prune_never_removes_a_blob_that_a_kept_backup_references() -> None:
    old = manifest("20130101T000000Z", b"a", b"b")
    kept = [manifest("20130108T000000Z", b"b", b"c"), manifest("20130109T000000Z", b"c", b"d")]
    everything = {sha(x) for x in (b"a", b"b", b"c", b"d", b"orphan")}
    doomed = unreferenced_blobs(everything, kept)
    assert doomed == {sha(b"a"), sha(b"orphan")}
    assert not doomed & (kept[0].blob_hashes() | kept[1].blob_hashes())
    assert sha(b"b") in old.blob_hashes() and sha(b"b") not in doomed


def test_verification_names_missing_short_and_corrupt_files() -> None:
    good, bad, short = b"good", b"bad", b"short"
    files = [
        FileEntry("data/good", sha(good), len(good)),
        FileEntry("data/missing", sha(b"gone"), 4),
        FileEntry("mlflow/mlflow.db", sha(bad), len(bad)),
        FileEntry("data/short", sha(short), len(short)),
    ]
    blobs = {sha(good): good, sha(bad): b"BAD", sha(short): b"shor"}
    problems = verify_entries(files, blobs.get)
    assert len(problems) == 3
    assert problems[0].startswith("data/missing") and "missing" in problems[0]
    assert problems[1].startswith("mlflow/mlflow.db") and "corrupt" in problems[1]
    assert problems[2].startswith("data/short") and "size" in problems[2]
    assert verify_entries(files[:1], blobs.get) == []


def test_manifest_round_trips_and_rejects_malformed_json() -> None:
    m = manifest("20130101T000000Z", b"a", b"bb")
    assert Manifest.from_json(m.to_json()) == m
    assert m.to_json()["total_bytes"] == 3
    with pytest.raises(BackupError, match="malformed"):
        Manifest.from_json({"backup_id": "x"})


def test_passwords_never_reach_the_manifest() -> None:
    out = redact_uri("postgresql://mlflow:s3cret@db.internal:5432/mlflow")
    assert "s3cret" not in out and out.startswith("postgresql://mlflow:***@db.internal:5432")
    assert redact_uri("sqlite:////x/mlflow.db") == "sqlite:////x/mlflow.db"


def test_snapshot_paths_map_to_an_mlops_home() -> None:
    assert local_target("mlflow/mlflow.db") == "mlflow.db"
    assert local_target("data/features/x/part.parquet") == "data/features/x/part.parquet"
    assert local_target("registry/registry.json") == "restored/registry/registry.json"


def test_target_checks_refuse_live_nonempty_small_and_unwritable(tmp_path: Path) -> None:
    live = tmp_path / "home"
    live.mkdir()
    (live / "mlflow.db").write_bytes(b"x")
    with pytest.raises(BackupError, match="live MLOPS_HOME"):
        check_target(live, 10, force=False, live_home=live)
    check_target(live, 10, force=True, live_home=live)  # forced: allowed
    other = tmp_path / "other"
    other.mkdir()
    (other / "f").write_text("x")
    with pytest.raises(BackupError, match="not empty"):
        check_target(other, 10, force=False, live_home=live)
    fresh = tmp_path / "a" / "b"
    check_target(fresh, 10, force=False, live_home=live)
    assert not (tmp_path / "a").exists()  # checking writes nothing
    with pytest.raises(BackupError, match="not enough space"):
        check_target(fresh, 100, force=False, live_home=None, disk_free=lambda _p: 99)
    with pytest.raises(BackupError, match="not enough space"):
        check_target(fresh, 10, force=False, live_home=None, keep_free_bytes=2**60)
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(BackupError, match="not a directory"):
        check_target(afile, 1, force=True, live_home=None)


def test_target_under_an_unwritable_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match="no permission"):
        check_target(Path("/proc/mlops-restore"), 1, force=False, live_home=None)


def test_artifact_locations_are_rewritten_to_the_restored_root(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    con = sqlite3.connect(db)
    con.execute("create table experiments (artifact_location text)")
    con.execute("create table model_versions (source text, storage_location text)")
    con.execute("insert into experiments values ('file:///old/home/mlartifacts/1')")
    con.execute(
        "insert into model_versions values ('models:/m-1', '/old/home/mlartifacts/models/m-1')"
    )
    con.commit()
    con.close()
    changed = rewrite_artifact_locations(str(db), "/old/home/mlartifacts", "/new/mlartifacts")
    con = sqlite3.connect(db)
    assert con.execute("select * from experiments").fetchone()[0] == "file:///new/mlartifacts/1"
    assert con.execute("select * from model_versions").fetchone() == (
        "models:/m-1",
        "/new/mlartifacts/models/m-1",
    )
    assert changed == 2


def test_proxied_artifact_locations_of_a_tracking_server_are_rewritten(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    con = sqlite3.connect(db)
    con.execute("create table runs (artifact_uri text)")
    con.executemany(
        "insert into runs values (?)",
        [("mlflow-artifacts:/1/abc/artifacts",), ("s3://other/1/x",), ("s3://art/mlflowx/2",)],
    )
    con.commit()
    con.close()
    changed = rewrite_artifact_locations(str(db), "s3://art/mlflow/", "/new/mlartifacts")
    con = sqlite3.connect(db)
    got = [r[0] for r in con.execute("select artifact_uri from runs")]
    # only whole prefixes move: another bucket, or a root that merely starts alike, stay
    assert got == ["/new/mlartifacts/1/abc/artifacts", "s3://other/1/x", "s3://art/mlflowx/2"]
    assert changed == 1


def test_postgres_passwords_go_to_the_environment_not_the_command_line() -> None:
    from tasks.backup.stores import is_postgres, pg_conninfo

    uri, env = pg_conninfo("postgresql+psycopg2://mlflow:s%40cret@db.internal:5433/mlflow")
    assert uri == "postgresql://mlflow@db.internal:5433/mlflow"
    assert env == {"PGPASSWORD": "s@cret"}
    assert pg_conninfo("postgresql://postgres@127.0.0.1/x") == (
        "postgresql://postgres@127.0.0.1/x",
        {},
    )
    assert is_postgres("postgres://h/x") and not is_postgres("sqlite:////x/mlflow.db")


def test_registry_read_from_the_snapshot_equals_the_clients_view(tmp_path: Path) -> None:
    """A real MLflow SQLite store: models, versions (one deleted), aliases and tags."""
    from mlflow.tracking import MlflowClient

    from mlops.settings import load_settings
    from tasks.backup.registry_state import registry_state, registry_state_from_snapshot
    from tasks.backup.stores import sqlite_snapshot

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    for name in ("b-model", "a-model"):
        client.create_registered_model(name, tags={"team": "ml"}, description=f"{name} desc")
        for i in range(3):
            client.create_model_version(name, f"/art/{name}/{i}", run_id=None, tags={"i": str(i)})
    client.delete_model_version("a-model", "2")
    client.set_registered_model_alias("a-model", "champion", "3")
    client.set_registered_model_alias("a-model", "challenger", "1")
    client.set_model_version_tag("b-model", "1", "features_uri", "s3://lake/features/x")
    sqlite_snapshot(str(tmp_path / "mlflow.db"), str(tmp_path / "snap.db"))

    expected = registry_state(load_settings(mlflow_tracking_uri=uri))
    expected["models"].sort(key=lambda m: m["name"])
    got = registry_state_from_snapshot(str(tmp_path / "snap.db"), uri)
    assert got == expected
    a = got["models"][0]
    assert [v["version"] for v in a["versions"]] == ["1", "3"]
    assert a["aliases"] == {"champion": "3", "challenger": "1"}
