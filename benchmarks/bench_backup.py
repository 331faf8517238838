"""Backup throughput against `cp -r` of the same bytes, and an incremental backup's share.

    python benchmarks/bench_backup.py --home /path/to/mlops-home      # state after `mlops run`
    python benchmarks/bench_backup.py --run                           # run the main job first

Both are measured in the same run, on the same state, into fresh directories on the same disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_main_job(home: Path) -> None:
    env = {**os.environ, "MLOPS_HOME": str(home), "MLOPS_SERVE_PORT": str(free_port())}
    env.pop("PREFECT_API_URL", None)
    subprocess.run([str(Path(sys.executable).parent / "mlops"), "run"], env=env, check=True)


def du(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        if p.is_file():
            total += p.stat().st_size
        else:
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path)
    ap.add_argument("--run", action="store_true", help="run `mlops run` into a temp home first")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-backup-"))
    home = args.home or work / "home"
    if args.run:
        run_main_job(home)
    os.environ["MLOPS_HOME"] = str(home)
    sys.path.insert(0, str(ROOT))
    from mlops.settings import load_settings
    from tasks.backup import drill_requests, registry_state, take_backup

    settings = load_settings()
    data = Path(settings.storage_root)
    sources = [data / "curated", data / "features", Path(settings.mlflow_artifact_root),
               home / "mlflow.db"]  # fmt: skip
    nbytes = du(sources)

    # Pay the one-off imports (mlflow, xgboost, the bundled flights) before timing anything.
    import mlflow.xgboost  # noqa: F401

    drill_requests()
    registry_state(settings)

    cp_dir = work / "cp"
    cp_dir.mkdir()
    t0 = time.monotonic()
    subprocess.run(["cp", "-r", *map(str, sources), str(cp_dir)], check=True)
    cp_s = time.monotonic() - t0

    root = str(work / "backups")
    stamp = datetime(2013, 12, 31, 5, tzinfo=UTC)
    full = take_backup(settings, root, stamp)
    incr = take_backup(settings, root, stamp + timedelta(days=1))
    # the same run once more, without the drill reference (model load + predict), for scale
    bare = take_backup(settings, str(work / "bare"), stamp, with_reference=False)

    print(f"state: {nbytes / 1e6:.1f} MB in the backed-up sources; backup {full.files} files")
    print(f"cp -r                    {cp_s:6.2f} s  {nbytes / 1e6 / cp_s:7.1f} MB/s")
    for label, r in (("full backup", full), ("full, no drill reference", bare)):
        rate = r.total_bytes / r.seconds
        print(f"{label:<24} {r.seconds:6.2f} s  {rate / 1e6:7.1f} MB/s"
              f"  ({rate / (nbytes / cp_s):.2f}x cp -r)")  # fmt: skip
    print(
        f"incremental (unchanged)  {incr.seconds:6.2f} s  {incr.new_files} new files, "
        f"{incr.new_bytes} bytes stored: {100 * incr.seconds / full.seconds:.1f}% of full"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
