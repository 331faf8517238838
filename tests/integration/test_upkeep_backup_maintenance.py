"""Backup, restore, the restore drill and daily maintenance on real local parts.

This module keeps its own state: MLOPS_HOME (and so the lake, MLflow store, artifacts and backups)
points into a temporary directory while it runs. It trains one small champion there, serves it
on the session's Serve, and removes the Serve application when done (modules that need one serve
their own champion in their fixtures). Each test builds the backups it checks, so any test of it
runs alone too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlops.registry import CHAMPION
from mlops.runtime import Runtime, free_port
from mlops.settings import Settings, load_settings

pytestmark = pytest.mark.integration

MLOPS = str(Path(sys.executable).parent / "mlops")
SMALL = {"trials": 2, "max_rounds": 20, "max_concurrent_trials": 2}


@pytest.fixture(scope="module")
def home(platform: Runtime, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An isolated MLOPS_HOME with a small trained champion, served on the session's Serve."""
    from flows.training import training_pipeline

    delete_served_app()  # start with nothing served from another home
    path = tmp_path_factory.mktemp("backup-home") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLOPS_HOME", str(path))
        for var in ("MLOPS_STORAGE_ROOT", "MLFLOW_TRACKING_URI", "MLOPS_MLFLOW_ARTIFACT_ROOT"):
            mp.delenv(var, raising=False)
        summary = training_pipeline(start="2013-06-01", end="2013-06-14", **SMALL)
        assert summary.decision.promote
        yield path
    delete_served_app()  # the next modules start with nothing served


def delete_served_app() -> None:
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.delete(load_settings().serve_app_name)
    except RayServeException:
        pass  # no Serve instance yet (this module run on its own)


def live_predictions(settings: Settings, requests: list[dict[str, Any]]) -> tuple[str, list]:
    resp = httpx.post(f"{settings.serve_url}/predict", json=requests, timeout=30)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    return body["version"], [p["probability_late"] for p in body["predictions"]]


def aliases(settings: Settings) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    rm = MlflowClient(
        settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri
    ).get_registered_model(settings.model_name)
    return {a: str(v) for a, v in rm.aliases.items()}


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLOPS_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([MLOPS, *args], env=env, capture_output=True, text=True, timeout=180)


def one_line_error(done: subprocess.CompletedProcess[str], text: str) -> None:
    assert done.returncode == 2, done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_restore_drill_back_up_delete_restore_same_predictions(home: Path) -> None:
    from flows.backup import backup
    from mlops.backups import read_manifest
    from mlops.storage import Storage
    from tasks.backup.drill import champion_predictions, drill_requests

    settings = load_settings()
    requests = drill_requests()
    version, before = live_predictions(settings, requests)
    aliases_before = aliases(settings)
    assert aliases_before[CHAMPION] == version

    result = backup(run_date="2013-06-22T03:00:00")
    assert result.backup_id == "20130622T030000Z"
    root = Storage(settings.backup_root)
    manifest = read_manifest(root, result.backup_id)
    paths = {f.path for f in manifest.files}
    assert {"mlflow/mlflow.db", "registry/registry.json", "serve/serve.json"} <= paths
    assert any(p.startswith("data/features/") for p in paths)
    assert any(p.startswith("data/curated/dims/") for p in paths)
    assert any(p.startswith("mlartifacts/") and p.endswith("MLmodel") for p in paths)
    assert all(len(f.sha256) == 64 and f.size >= 0 for f in manifest.files)
    pointer = Storage(settings.dr_pointer_root).read_json("latest.json")
    assert pointer["backup_id"] == result.backup_id

    # delete the working state (the backups stay where they are)
    for name in ("data", "mlartifacts", "mlflow.db"):
        target = home / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    refused = run_cli("restore", "latest", "--target", str(home), home=home)
    one_line_error(refused, "live MLOPS_HOME")
    assert not (home / "mlflow.db").exists()

    done = run_cli("restore", "latest", "--target", str(home), "--force", home=home)
    assert done.returncode == 0, done.stderr
    assert "champion loads" in done.stdout
    assert aliases(settings) == aliases_before
    got = champion_predictions(
        settings.mlflow_tracking_uri, settings.model_name, Storage(settings.storage_root), None,
        requests,
    )  # fmt: skip
    assert got is not None and got[0] == version
    assert max(abs(a - b) for a, b in zip(got[1], before, strict=True)) < 1e-5
    assert (home / "backups" / "snapshots" / result.backup_id / "manifest.json").exists()


def test_incremental_backup_references_unchanged_files_and_prune_keeps_them(home: Path) -> None:
    """A file with the size and modification time it had at the last backup is not read again:
    its entry keeps the old hash even when its bytes were swapped behind the backup's back
    (content dedup alone would have stored the new bytes). A new modification time makes the
    next backup read it."""
    import hashlib

    from mlops.backups import (
        RetentionPolicy,
        list_backups,
        open_root,
        read_manifest,
        timestamp_for,
    )
    from tasks.backup.restore import verify_backup
    from tasks.backup.take import prune, take_backup

    settings = load_settings()
    probe = Path(settings.storage_root) / "curated" / "incremental-probe" / "probe.bin"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b"a" * 4096)
    rel = "data/curated/incremental-probe/probe.bin"
    root = open_root(settings.backup_root, {}, create=True)

    def entry(backup_id: str) -> Any:
        return next(f for f in read_manifest(root, backup_id).files if f.path == rel)

    try:
        first = take_backup(settings, settings.backup_root, timestamp_for("2013-06-23T03:00:00"))
        assert entry(first.backup_id).sha256 == hashlib.sha256(b"a" * 4096).hexdigest()
        before = probe.stat()
        probe.write_bytes(b"b" * 4096)
        os.utime(probe, ns=(before.st_atime_ns, before.st_mtime_ns))
        second = take_backup(settings, settings.backup_root, timestamp_for("2013-06-24T03:00:00"))
        assert entry(second.backup_id).sha256 == entry(first.backup_id).sha256  # not read
        assert second.files == first.files
        # unchanged state: only small generated records (if anything) are stored again
        assert second.new_bytes < 0.05 * second.total_bytes
        assert second.reused_hashes >= second.files - 3
        os.utime(probe)  # now
        third = take_backup(settings, settings.backup_root, timestamp_for("2013-06-24T12:00:00"))
        assert entry(third.backup_id).sha256 == hashlib.sha256(b"b" * 4096).hexdigest()
        assert third.new_files >= 1 and third.new_bytes >= 4096
    finally:
        shutil.rmtree(probe.parent)
    before_prune = list_backups(root)
    assert len(before_prune) >= 3
    pruned = prune(root, RetentionPolicy(daily=1, weekly=0))
    assert pruned.kept == (third.backup_id,)
    assert set(pruned.removed) == set(before_prune) - {third.backup_id}
    assert list_backups(root) == [third.backup_id]
    verify_backup(root, third.backup_id)  # every blob it references survived


def test_corrupt_or_missing_blob_stops_restore_and_leaves_target_untouched(
    home: Path, tmp_path: Path
) -> None:
    from mlops.backups import blob_rel, open_root, read_manifest, timestamp_for
    from mlops.errors import BackupError
    from tasks.backup.restore import restore
    from tasks.backup.take import take_backup

    settings = load_settings()
    copy = tmp_path / "backups"  # a backup of its own, to break
    bid = take_backup(settings, str(copy), timestamp_for("2013-06-27")).backup_id
    root = open_root(str(copy), {}, create=False)
    entries = read_manifest(root, bid).files
    victim = next(f for f in entries if f.path.endswith("MLmodel"))
    blob = Path(root.path(blob_rel(victim.sha256)))
    blob.write_bytes(blob.read_bytes() + b"tampered")
    target = tmp_path / "restored"
    with pytest.raises(BackupError, match=f"{victim.path}: size"):
        restore(root, bid, target)
    assert not target.exists()
    blob.unlink()
    with pytest.raises(BackupError, match=f"{victim.path}: blob .* is missing"):
        restore(root, bid, target)
    assert not target.exists() and not list(tmp_path.glob(".restored.restore-*"))


def test_backup_to_s3_and_restore_from_it(home: Path, s3_endpoint: str, tmp_path: Path) -> None:
    import s3fs

    from mlops.backups import open_root, timestamp_for
    from tasks.backup.restore import restore
    from tasks.backup.take import take_backup

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir("backup-bucket")
    settings = load_settings()
    uri = "s3://backup-bucket/flights"
    result = take_backup(settings, uri, timestamp_for("2013-06-25"))
    assert result.manifest_uri.startswith(uri)
    again = take_backup(settings, uri, timestamp_for("2013-06-26"))
    assert again.new_bytes < 0.05 * again.total_bytes
    restored = restore(
        open_root(uri, settings.storage_options, create=False), "latest", tmp_path / "r"
    )
    assert restored.champion_loaded and restored.aliases == aliases(settings)
    assert (tmp_path / "r" / "mlflow.db").exists()


def age(path: Path, days: float) -> None:
    """Set the modification time of ``path`` and everything under it ``days`` back."""
    import time

    then = time.time() - days * 86400
    for p in [path, *path.rglob("*")]:
        os.utime(p, (then, then))


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_daily_maintenance_reports_every_check_and_cleans_up(home: Path, tmp_path: Path) -> None:
    """Dry-run lists exactly the old leftovers and removes nothing; the real run removes exactly
    those, and the champion's Tune results, as old as the stray ones, are kept."""
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    from flows.maintenance import daily_maintenance
    from mlops.backups import now_utc
    from tasks.maintenance.cleanup import clean_up
    from tasks.maintenance.core import CleanupRules

    settings = load_settings()
    ray_tmp = tmp_path / "ray"
    old_session = ray_tmp / "session_2013-01-01_00-00-00_1"
    old_session.mkdir(parents=True)
    (old_session / "spill.bin").write_bytes(b"x" * 1000)
    young = ray_tmp / "session_2099-01-01_00-00-00_2"
    young.mkdir()
    stale_tmp = Path(settings.storage_root) / "features" / "_tmp" / "abandoned"
    stale_tmp.mkdir(parents=True)
    (stale_tmp / "part.parquet").write_bytes(b"y" * 500)
    results = Path(settings.storage_root) / "ray_results"
    snapshot = (
        MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
        .get_model_version_by_alias(settings.model_name, CHAMPION)
        .tags["feature_snapshot_hash"]
    )
    # Tune's results of the champion's search (a restore brings back no Tune results: then
    # a folder of the name Tune gives them)
    found = [d for d in results.glob(f"hpo-{snapshot}*") if d.is_dir()]
    champion_tune = found[0] if found else results / f"hpo-{snapshot}-a1b2c3"
    (champion_tune / "trial_0").mkdir(parents=True, exist_ok=True)
    (champion_tune / "trial_0" / "result.json").write_bytes(b"c" * 3000)
    stray_tune = results / "hpo-0123456789ab-stray"
    (stray_tune / "trial_0").mkdir(parents=True)
    (stray_tune / "trial_0" / "result.json").write_bytes(b"z" * 2000)
    for p, days in ((old_session, 7), (stale_tmp, 7), (stray_tune, 30), (champion_tune, 30)):
        age(p, days)
    doomed = (old_session, stale_tmp, stray_tune)
    kept = (young, champion_tune)
    doomed_bytes = sum(tree_bytes(p) for p in doomed)
    assert doomed_bytes == 3500
    params = {
        "ray_temp_dir": str(ray_tmp), "require_serve": True, "max_failed_runs": 1000,
        "drill_scratch": str(tmp_path / "scratch"),
        "inference_log_days": 1e6,  # the served requests' logs (dated 2013) are not this test's
    }  # fmt: skip

    # the cleanup check's own dry run (the flow's cleanup_dry_run=True calls just this)
    rules = CleanupRules(tmp_days=1.0, ray_session_days=3.0, tune_results_days=14.0,
                         inference_log_days=1e6)  # fmt: skip
    cleanup = clean_up(settings, settings.backup_root, rules, True, str(ray_tmp), now_utc())
    assert cleanup.figure == f"3 items, {doomed_bytes} bytes (dry-run)", cleanup
    assert cleanup.detail.startswith("would remove 3 items: ")
    assert "stray" in cleanup.detail and "1 old items kept as protected" in cleanup.detail
    assert all(p.exists() for p in (*doomed, *kept))  # a dry run removes nothing

    report = daily_maintenance(**params)
    by_name = {c.name: c for c in report.checks}
    assert set(by_name) == {
        "ray_resources", "storage_roundtrip", "mlflow_champion", "serving", "prefect_api",
        "cleanup", "validate_backups", "utilization", "error_log",
    }  # fmt: skip
    assert all(c.status == "ok" for c in report.checks), report.table()
    assert by_name["serving"].figure.startswith("RUNNING")
    assert "max |diff|" in by_name["validate_backups"].detail
    assert by_name["cleanup"].figure == f"3 items, {doomed_bytes} bytes"
    assert by_name["cleanup"].detail.startswith("removed 3 items: ")
    assert not any(p.exists() for p in doomed)
    assert all(p.exists() for p in kept)
    assert tree_bytes(champion_tune) > 0  # the champion's Tune results are whole
    assert (settings.home / "maintenance" / "utilization.json").exists()
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
    md = next(a for a in artifact if a.key == "daily-maintenance").data
    assert md.count("| OK |") == 9


def with_wrong_reference(backup_root: str, copy: Path) -> str:
    """A copy of the latest backup whose recorded predictions are off by 0.01: a restored
    champion that predicts otherwise than before the backup, as the drill must catch. Every
    blob still matches its hash, so only the prediction check can fail."""
    import dataclasses
    import json

    from mlops.backups import (
        REFERENCE,
        Manifest,
        blob_rel,
        list_backups,
        manifest_rel,
        open_root,
        read_manifest,
        sha256_bytes,
    )

    shutil.copytree(backup_root, copy)
    root = open_root(str(copy), {}, create=False)
    bid = list_backups(root)[-1]
    manifest = read_manifest(root, bid)
    ref_entry = next(f for f in manifest.files if f.path == REFERENCE)
    reference = json.loads(root.read_bytes(blob_rel(ref_entry.sha256)))
    assert reference["predictions"], "the backup holds no champion predictions"
    reference["predictions"] = [p + 0.01 for p in reference["predictions"]]
    data = json.dumps(reference).encode()
    root.write_bytes(blob_rel(sha256_bytes(data)), data)
    files = tuple(
        dataclasses.replace(f, sha256=sha256_bytes(data), size=len(data))
        if f.path == REFERENCE
        else f
        for f in manifest.files
    )
    root.write_json(manifest_rel(bid), Manifest(**{**vars(manifest), "files": files}).to_json())
    return bid


def test_daily_maintenance_fails_when_a_check_fails(home: Path, tmp_path: Path) -> None:
    """A backup whose restored champion predicts otherwise fails the drill, and the flow."""
    from flows.maintenance import daily_maintenance
    from tasks.maintenance.core import MaintenanceFailed

    bid = with_wrong_reference(load_settings().backup_root, tmp_path / "wrong")
    state = daily_maintenance(
        backup_root=str(tmp_path / "wrong"), cleanup_dry_run=True, min_gpus=64,
        max_failed_runs=1000, ray_temp_dir=str(tmp_path / "ray"), return_state=True,
    )  # fmt: skip
    assert state.is_failed()
    with pytest.raises(MaintenanceFailed) as info:
        state.result()
    failed = {c.name: c for c in info.value.report.failed}
    assert set(failed) == {"validate_backups", "ray_resources"}
    detail = failed["validate_backups"].detail
    assert f"restore drill on {bid} failed" in detail and "max |diff| 1.00e-02" in detail, detail
    assert "GPU" in failed["ray_resources"].detail


def test_validate_backups_fails_without_a_backup(home: Path, tmp_path: Path) -> None:
    from mlops.errors import CheckFailed
    from tasks.backup.prefect_tasks import validate_backups

    empty = tmp_path / "no-backups"
    empty.mkdir()
    with pytest.raises(CheckFailed, match="no backup under"):
        validate_backups.fn(load_settings(), str(empty), str(tmp_path / "scratch"), True)
    skipped = validate_backups.fn(load_settings(), str(empty), str(tmp_path / "scratch"), False)
    assert skipped.status == "skipped"


@pytest.mark.parametrize("case", ["unknown_id", "missing_root", "s3_unreachable", "no_space",
                                  "no_permission"])  # fmt: skip
def test_restore_bad_input_is_one_line_and_writes_nothing(
    case: str, home: Path, tmp_path: Path
) -> None:
    target = tmp_path / "target"
    args = ["restore", "latest", "--target", str(target)]
    expected = {
        "unknown_id": "unknown backup id",
        "missing_root": "does not exist",
        "s3_unreachable": "is unreachable",
        "no_space": "not enough space",
        "no_permission": "no permission",
    }[case]
    if case == "unknown_id":
        args[1] = "20000101T000000Z"
    elif case == "missing_root":
        args += ["--backup-root", str(tmp_path / "nowhere")]
    elif case == "s3_unreachable":
        args += ["--backup-root", "s3://backup-bucket/x"]
    elif case == "no_space":
        args += ["--keep-free", str(2**60)]
    elif case == "no_permission":
        target = Path("/proc/mlops-restore-target")
        args[3] = str(target)
    env_home = home
    if case == "s3_unreachable":
        os.environ["AWS_ENDPOINT_URL"], saved = (
            f"http://127.0.0.1:{free_port()}",
            os.environ.get("AWS_ENDPOINT_URL", ""),
        )
        try:
            done = run_cli(*args, home=env_home)
        finally:
            os.environ["AWS_ENDPOINT_URL"] = saved
    else:
        done = run_cli(*args, home=env_home)
    one_line_error(done, expected)
    assert not target.exists()


def test_backup_to_an_unreachable_root_is_one_line_and_writes_nothing(
    home: Path, tmp_path: Path
) -> None:
    def state() -> dict[str, bytes]:  # every backup and the DR pointer, as bytes
        return {
            str(p): p.read_bytes()
            for d in (home / "backups", home / "dr")
            for p in sorted(d.rglob("*"))
            if p.is_file()
        }

    from mlops.backups import timestamp_for
    from tasks.backup.take import take_backup

    settings = load_settings()  # a backup exists, so a stray write into the root would show
    take_backup(settings, settings.backup_root, timestamp_for("2013-06-28"))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    before = state()
    done = run_cli("backup", "--backup-root", str(blocker / "backups"), home=home)
    one_line_error(done, "backup root")
    assert blocker.read_text() == "not a directory"
    done = run_cli("backup", "--run-date", "someday", home=home)
    one_line_error(done, "run_date")
    assert state() == before
    assert not list(tmp_path.rglob(".tmp-*")) and not list(home.rglob(".tmp-*"))
