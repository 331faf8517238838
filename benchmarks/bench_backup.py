"""Backup throughput against `cp -r` of the same bytes, and an incremental backup's share.

    python benchmarks/bench_backup.py --home /path/to/mlops-home      # state after `mlops run`
    python benchmarks/bench_backup.py --run                           # run the main job first
    python benchmarks/bench_backup.py --home .mlops --extra-mb 1000   # also a grown state

Everything is measured in the same run, on the same state, into fresh directories on the same
disk. Two states:

- **main job**: what `mlops run` leaves (curated dims, the feature snapshot, MLflow artifacts and
  store). At about 12 MB, fixed costs (registry query, SQLite online backup, the drill reference)
  outweigh the bytes.
- **grown** (``--extra-mb``): the same plus more feature-snapshot files of distinct content, as
  the lake holds after many retrains, so that per-byte costs dominate.

`cp -r` leaves its copy in the page cache; the backup fsyncs every new blob before it renames it
into place. `cp -r` + `sync` is printed as the durable equivalent.
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


def grow_lake(data: Path, into: Path, extra_mb: int, file_mb: int = 25) -> Path:
    """A copy of the lake's backed-up zones plus ``extra_mb`` of new snapshot files."""
    for zone in ("curated", "features"):
        shutil.copytree(data / zone, into / zone)
    rng = __import__("random").Random(2013)
    for i in range(max(1, extra_mb // file_mb)):
        part = into / "features" / f"grown-{i:03d}" / "part-0.parquet"
        part.parent.mkdir(parents=True)
        part.write_bytes(rng.randbytes(file_mb * 1_000_000))
    return into


def timed_cp(sources: list[Path], dest: Path, sync: bool) -> float:
    dest.mkdir()
    subprocess.run(["sync"], check=True)
    t0 = time.monotonic()
    subprocess.run(["cp", "-r", *map(str, sources), str(dest)], check=True)
    if sync:
        subprocess.run(["sync"], check=True)
    return time.monotonic() - t0


def files_under(paths: list[Path]) -> list[Path]:
    return [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]


def timed_hash_only(sources: list[Path]) -> float:
    """The floor of any backup whose manifest holds a sha256 of every file: hashing the bytes
    alone, with the backup's own reader (hashlib releases the GIL) on every core, nothing
    written."""
    from concurrent.futures import ThreadPoolExecutor

    from mlops.backups import READ_THREADS, sha256_file

    files = [str(f) for f in files_under(sources)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(READ_THREADS) as pool:
        list(pool.map(sha256_file, files))
    return time.monotonic() - t0


def measure(label: str, settings, sources: list[Path], work: Path) -> list[str]:
    from tasks.backup.take import take_backup

    nbytes = du(sources)
    cp_s = timed_cp(sources, work / f"cp-{label}", sync=False)
    cps_s = timed_cp(sources, work / f"cps-{label}", sync=True)
    hash_s = timed_hash_only(sources)
    stamp = datetime(2013, 12, 31, 5, tzinfo=UTC)
    subprocess.run(["sync"], check=True)
    full = take_backup(settings, str(work / f"backups-{label}"), stamp)
    incr = take_backup(settings, str(work / f"backups-{label}"), stamp + timedelta(days=1))
    bare = take_backup(settings, str(work / f"bare-{label}"), stamp, with_reference=False)
    cp_rate = nbytes / cp_s
    rows = [
        f"\n{label}: {nbytes / 1e6:.1f} MB in the backed-up sources, {full.files} files",
        f"{'what':<34} {'s':>7} {'MB/s':>8} {'vs cp -r':>9}",
        f"{'cp -r':<34} {cp_s:7.3f} {cp_rate / 1e6:8.0f} {1:9.2f}x",
        f"{'cp -r + sync':<34} {cps_s:7.3f} {nbytes / cps_s / 1e6:8.0f} {cp_s / cps_s:9.2f}x",
        f"{'sha256 of the bytes alone':<34} {hash_s:7.3f} {nbytes / hash_s / 1e6:8.0f} "
        f"{cp_s / hash_s:9.2f}x",
    ]
    for name, r in (("full backup", full), ("full, drill reference not taken", bare)):
        rate = r.total_bytes / r.seconds
        rows.append(f"{name:<34} {r.seconds:7.3f} {rate / 1e6:8.0f} {rate / cp_rate:9.2f}x")
    rows.append(
        f"{'incremental (unchanged state)':<34} {incr.seconds:7.3f} {'':>8} "
        f"{100 * incr.seconds / full.seconds:8.1f}% of full ({incr.new_files} new files)"
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path)
    ap.add_argument("--run", action="store_true", help="run `mlops run` into a temp home first")
    ap.add_argument("--extra-mb", type=int, default=1000, help="grown state: MB added (0: skip)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-backup-"))
    home = (args.home or work / "home").resolve()
    if args.run:
        run_main_job(home)
    os.environ["MLOPS_HOME"] = str(home)
    sys.path.insert(0, str(ROOT))
    from mlops.settings import load_settings
    from tasks.backup.take import take_backup

    settings = load_settings()
    data = Path(settings.storage_root)
    store = [Path(settings.mlflow_artifact_root), home / "mlflow.db"]

    # Pay the one-off costs of a process (imports of mlflow and xgboost, the bundled flights,
    # the first model load and prediction) in a throwaway backup before timing anything.
    take_backup(settings, str(work / "warm-up"), datetime(2013, 1, 1, tzinfo=UTC))
    try:
        out = measure("main job", settings, [data / "curated", data / "features", *store], work)
        if args.extra_mb:
            grown = grow_lake(data, work / "grown-lake", args.extra_mb)
            grown_settings = load_settings(storage_root=str(grown))
            out += measure(
                f"grown (+{args.extra_mb} MB)",
                grown_settings,
                [grown / "curated", grown / "features", *store],
                work,
            )
        print("\n".join(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
