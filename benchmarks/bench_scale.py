"""Scale benchmark: the transform and training stages at 1x, 10x and 30x the flights data.

    make bench-scale
    make bench-scale ARGS="--sizes 1,10 --pandas-max-size 10"

The real 2013 data is ingested with ``tasks.ingest`` into a temporary storage root; larger sizes
add whole years after it (dates shifted by whole years, numeric fields jittered with a fixed
seed), written as the same daily partitions. The raw source is never modified. Then, per size,
on one embedded local Ray:

- transform: ``tasks.transform.build_feature_snapshot`` (Ray Data), and in a child process a
  single-process pandas version of the same transform (``mlops.features.build_features``, the
  same join, split and Parquet output), timed in the same run;
- tune: ``tasks.tune.run_search`` with a fixed budget (default one trial of 100 boosting rounds,
  early stopping off, so every size trains the same number of rounds).

Recorded per stage: wall time, peak RSS of this (driver) process, peak object-store usage
(sampled from the raylet every 100 ms). Prints a markdown table; ``--json`` also writes it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import posixpath
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASE_YEAR = 2013
MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Data: 2013 as ingested, then whole shifted and jittered years


def _shift_hhmm(values: Any, minutes: Any) -> Any:
    """HHMM clock times moved by ``minutes``, wrapped within the day."""
    import numpy as np

    total = (values // 100) * 60 + values % 100 + minutes
    total = np.mod(total, 1440)
    return (total // 60) * 100 + total % 60


def jitter_year(flights: Any, weather: Any, offset: int, seed: int) -> tuple[Any, Any]:
    """Copies of one year's flights and weather moved ``offset`` years on, numeric fields jittered.

    Deterministic for a (seed, offset) pair. Offset 0 returns the data unchanged.
    """
    import numpy as np

    if offset == 0:
        return flights, weather
    rng = np.random.default_rng([seed, offset])
    year = BASE_YEAR + offset
    f = flights.copy()
    w = weather.copy()
    for frame in (f, w):
        frame["year"] = year
        if "time_hour" in frame:
            frame["time_hour"] = str(year) + frame["time_hour"].astype(str).str[4:]
    n = len(f)
    for col in ("sched_dep_time", "sched_arr_time"):
        f[col] = _shift_hhmm(f[col].to_numpy(), rng.integers(-5, 6, n)).astype(f[col].dtype)
    for col in ("dep_delay", "arr_delay", "air_time"):
        f[col] = f[col] + rng.integers(-3, 4, n)  # NaN (cancelled, diverted) stays NaN
    m = len(w)
    for col, scale in (("temp", 1.5), ("dewp", 1.5), ("wind_speed", 1.0), ("pressure", 1.0)):
        w[col] = w[col] + rng.normal(0.0, scale, m).round(1)
    w["humid"] = (w["humid"] + rng.normal(0.0, 2.0, m)).clip(0, 100).round(2)
    w["wind_speed"] = w["wind_speed"].clip(lower=0)
    return f, w


@dataclass
class Lake:
    root: str
    dates: dict[int, list[str]] = field(default_factory=dict)  # year -> its dates
    rows: dict[str, int] = field(default_factory=dict)  # date -> flights
    cancelled: dict[str, int] = field(default_factory=dict)
    carriers: tuple[str, ...] = ()


def build_lake(root: str, years: int, seed: int) -> Lake:
    """Ingest 2013 into ``root`` and write ``years - 1`` more shifted, jittered years beside it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlops.lake import partition_path
    from mlops.sources import BUNDLED_SOURCE
    from mlops.storage import Storage
    from tasks.ingest import Window, ingest, split_by_date

    storage = Storage(root)
    ingest(
        BUNDLED_SOURCE, Window(dt.date(BASE_YEAR, 1, 1), dt.date(BASE_YEAR, 12, 31)), storage, {}
    )

    def read_all(table: str) -> Any:
        rel = posixpath.join("raw", table)
        files = storage.find(rel, ".parquet")
        return pa.concat_tables([pq.read_table(p) for p in files]).to_pandas()

    flights, weather = read_all("flights"), read_all("weather")
    lake = Lake(root, carriers=tuple(sorted(flights["carrier"].dropna().unique())))
    for offset in range(years):
        year = BASE_YEAR + offset
        f, w = jitter_year(flights, weather, offset, seed)
        win = Window(dt.date(year, 1, 1), dt.date(year, 12, 31))
        f_parts, w_parts = split_by_date(f, win), split_by_date(w, win)
        if offset:  # 2013 is already there, as ingest landed it
            for table, parts in (("flights", f_parts), ("weather", w_parts)):
                for day, part in parts.items():
                    path = storage.path(partition_path(table, day))
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    pq.write_table(part, path, compression="zstd")
        lake.dates[year] = sorted(f_parts)
        for day, part in f_parts.items():
            lake.rows[day] = part.num_rows
            lake.cancelled[day] = part.column("arr_delay").null_count
    return lake


def report_for(lake: Lake, size: int) -> Any:
    """A passing validation report over the first ``size`` years (the transform's input)."""
    from mlops.fingerprint import fingerprint
    from mlops.results import PartitionCheck, ValidationReport

    dates = [d for y in sorted(lake.dates)[:size] for d in lake.dates[y]]
    checks = tuple(PartitionCheck(d, lake.rows[d], lake.cancelled[d], ()) for d in dates)
    rows = sum(c.rows for c in checks)
    return ValidationReport(
        start=dates[0],
        end=dates[-1],
        rows=rows,
        quarantined_rows=0,
        cancelled_or_diverted=sum(c.cancelled_or_diverted for c in checks),
        max_quarantine_share=0.05,
        partitions=checks,
        expectations=(),
        report_uri="",
        fingerprint=fingerprint("bench-scale", lake.root, dates[0], dates[-1], rows),
        carriers=lake.carriers,
    )


# ---------------------------------------------------------------------------------------------
# Measuring: driver RSS and object-store usage


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs`` 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class ObjectStoreProbe:
    """Bytes used in the object store of every node, from the raylet's memory-info RPC."""

    def __init__(self) -> None:
        import ray
        from ray._private.grpc_utils import init_grpc_channel
        from ray._private.internal_api import MAX_MESSAGE_LENGTH, build_address
        from ray.core.generated import node_manager_pb2, node_manager_pb2_grpc

        node = next(n for n in ray.nodes() if n["Alive"])
        channel = init_grpc_channel(
            build_address(node["NodeManagerAddress"], node["NodeManagerPort"]),
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_LENGTH)],
        )
        self._stub = node_manager_pb2_grpc.NodeManagerServiceStub(channel)
        self._request = node_manager_pb2.FormatGlobalMemoryInfoRequest(include_memory_info=False)

    def used(self) -> int:
        stats = self._stub.FormatGlobalMemoryInfo(self._request, timeout=10).store_stats
        return int(stats.object_store_bytes_used + stats.object_store_bytes_fallback)


class Sampler:
    """Peak driver RSS and peak object-store usage while a stage runs."""

    def __init__(self, probe: ObjectStoreProbe, every_s: float = 0.1) -> None:
        self.probe, self.every_s = probe, every_s
        self.rss_peak = self.store_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.rss_peak = max(self.rss_peak, _rss_bytes())
        try:
            self.store_peak = max(self.store_peak, self.probe.used())
        except Exception:  # a missed sample must not fail the stage being measured
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self) -> Sampler:
        self.hwm_reset = _reset_hwm()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        hwm = _hwm_bytes() if self.hwm_reset else None
        if hwm:
            self.rss_peak = max(self.rss_peak, hwm)


# ---------------------------------------------------------------------------------------------
# Stages


def pandas_transform(root: str, dates: list[str], out_dir: str) -> dict[str, float]:
    """The transform in one process with pandas: read, join, featurize, split, write Parquet."""
    import resource

    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlops.features import LABEL, Lookups, assign_split, build_features, split_bounds
    from mlops.lake import partition_path
    from mlops.storage import Storage
    from tasks.transform import READ_COLUMNS, WEATHER_READ_COLUMNS, load_planes

    t = time.perf_counter()
    storage = Storage(root)
    flights = pa.concat_tables(
        [
            pq.read_table(storage.path(partition_path("flights", d)), columns=READ_COLUMNS)
            for d in dates
        ],
        promote_options="permissive",
    ).to_pandas()
    weather_files = [storage.path(partition_path("weather", d)) for d in dates]
    weather = pa.concat_tables(
        [pq.read_table(p, columns=WEATHER_READ_COLUMNS) for p in weather_files if os.path.exists(p)]
    ).to_pandas()
    out = build_features(flights, Lookups.from_frames(weather, load_planes(storage)))
    out["split"] = assign_split(out["date"], split_bounds(dates))
    out = out[out[LABEL].notna() & out["split"].notna()].reset_index(drop=True)
    pq.write_to_dataset(
        pa.Table.from_pandas(out, preserve_index=False), out_dir, partition_cols=["split"]
    )
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "rows_in": len(flights), "rows_out": len(out), "peak_rss": peak}


def run_pandas(root: str, dates: list[str], work: str) -> dict[str, float]:
    """``pandas_transform`` in a fresh child process (its memory never counts as the driver's)."""
    dates_file = os.path.join(work, "pandas-dates.json")
    out_dir = os.path.join(work, "pandas-out")
    Path(dates_file).write_text(json.dumps(dates))
    proc = subprocess.run(
        [sys.executable, __file__, "--pandas-child", root, dates_file, out_dir],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    if proc.returncode:
        raise RuntimeError(f"pandas baseline exited {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def warm_worker() -> None:
    """Import the stages' libraries in a worker, so that no measured stage pays for them."""
    import importlib

    for name in ("ray.data", "ray.tune", "xgboost", "tasks.transform", "tasks.tune"):
        importlib.import_module(name)


def measure_transform(
    size: int, lake: Lake, args: argparse.Namespace, probe: ObjectStoreProbe
) -> tuple[dict, Any]:
    """Ray Data transform (and, up to ``--pandas-max-size``, the pandas one) over ``size``."""
    from mlops.storage import Storage
    from tasks.transform import TransformConfig, build_feature_snapshot

    storage = Storage(lake.root)
    report = report_for(lake, size)
    row: dict[str, Any] = {"size": size, "days": len(report.accepted_dates), "rows_in": report.rows}
    config = TransformConfig(op_resource_reservation=args.op_reservation)
    with Sampler(probe) as s:
        t = time.perf_counter()
        features = build_feature_snapshot(report, storage, config)
        row["transform_s"] = time.perf_counter() - t
    row["rows_out"] = sum(features.rows.values())
    row["transform_driver_peak"], row["transform_store_peak"] = s.rss_peak, s.store_peak
    row["ray_rows_per_s"] = report.rows / row["transform_s"]

    if size <= args.pandas_max_size:
        base = run_pandas(lake.root, list(report.accepted_dates), args.work)
        if int(base["rows_out"]) != row["rows_out"]:
            raise RuntimeError(f"pandas wrote {base['rows_out']} rows, Ray Data {row['rows_out']}")
        row["pandas_s"], row["pandas_peak"] = base["seconds"], base["peak_rss"]
        row["pandas_rows_per_s"] = report.rows / base["seconds"]
    return row, features


def measure_tune(row: dict, features: Any, args: argparse.Namespace, probe: Any) -> None:
    """The Tune search over one size's snapshot, with a fixed budget; adds its figures to row."""
    from mlops.storage import Storage
    from tasks.tune import TuneBudget, pick_best, run_search

    budget = TuneBudget(
        num_samples=args.trials,
        max_concurrent=args.trials,
        max_rounds=args.rounds,
        early_stopping_rounds=args.rounds,  # off: every size trains the same number of rounds
        cpus_per_trial=args.cpus_per_trial,
        use_gpu=False,
    )
    with Sampler(probe) as s:
        t = time.perf_counter()
        grid, _ = run_search(Storage(args.lake_root), features, budget)
        row["tune_s"] = time.perf_counter() - t
    row["tune_driver_peak"], row["tune_store_peak"] = s.rss_peak, s.store_peak
    best = pick_best(grid)
    row["valid_auc"] = float(best.metrics["valid_auc"])
    row["rounds"] = int(best.metrics["rounds"])


# ---------------------------------------------------------------------------------------------
# Report


def table(rows: list[dict], args: argparse.Namespace) -> str:
    def mib(v: float) -> str:
        return f"{v / MIB:,.0f}"

    base = rows[0]
    lines = [
        "| size | flights in | rows out | transform s | x of 1x | Ray Data rows/s | pandas s "
        "| pandas rows/s | Ray/pandas | pandas peak MiB | driver peak MiB (transform / tune) "
        "| object store peak MiB (transform / tune) "
        f"| tune s ({args.trials} x {args.rounds} rounds) | x of 1x | valid AUC |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "pandas_s" in r:
            pandas = [
                f"{r['pandas_s']:.1f}",
                f"{r['pandas_rows_per_s']:,.0f}",
                f"{r['ray_rows_per_s'] / r['pandas_rows_per_s']:.2f}",
                mib(r["pandas_peak"]),
            ]
        else:
            pandas = [f"not run (size > --pandas-max-size {args.pandas_max_size})", "–", "–", "–"]
        lines.append(
            "| "
            + " | ".join(
                [
                    f"{r['size']}x",
                    f"{r['rows_in']:,}",
                    f"{r['rows_out']:,}",
                    f"{r['transform_s']:.1f}",
                    f"{r['transform_s'] / base['transform_s'] * base['size']:.1f}",
                    f"{r['ray_rows_per_s']:,.0f}",
                    *pandas,
                    f"{mib(r['transform_driver_peak'])} / {mib(r['tune_driver_peak'])}",
                    f"{mib(r['transform_store_peak'])} / {mib(r['tune_store_peak'])}",
                    f"{r['tune_s']:.1f}",
                    f"{r['tune_s'] / base['tune_s'] * base['size']:.1f}",
                    f"{r['valid_auc']:.4f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,10,30", help="multiples of the 2013 data")
    parser.add_argument(
        "--pandas-max-size",
        type=int,
        default=10,
        help="largest size for the single-process pandas baseline (it holds the whole window)",
    )
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--cpus-per-trial", type=int, default=1)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--op-reservation",
        action="store_true",
        help="keep Ray Data's per-operator resource reservation on (the transform turns it off)",
    )
    parser.add_argument("--workdir", default=None, help="parent of the temporary storage root")
    parser.add_argument("--keep", action="store_true", help="keep the temporary storage root")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--pandas-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.pandas_child:
        root, dates_file, out_dir = args.pandas_child
        result = pandas_transform(root, json.loads(Path(dates_file).read_text()), out_dir)
        print(json.dumps(result), flush=True)
        # Skip interpreter teardown: a native thread pool now and then aborted it (SIGABRT,
        # "terminate called without an active exception") after the result was out.
        os._exit(0)

    import ray

    sizes = sorted({int(s) for s in args.sizes.split(",")})
    args.work = tempfile.mkdtemp(prefix="mlops-scale-", dir=args.workdir)
    root = args.lake_root = os.path.join(args.work, "lake")
    try:
        t = time.perf_counter()
        lake = build_lake(root, max(sizes), args.seed)
        build_s = time.perf_counter() - t
        ray.init(
            address="local",  # a new local instance, never a cluster left running here
            num_cpus=args.num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            runtime_env={
                "env_vars": {
                    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
                    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
                }
            },
        )
        cpus = int(ray.cluster_resources().get("CPU", 1))
        warm = ray.remote(num_cpus=1)(warm_worker)
        ray.get([warm.remote() for _ in range(cpus)])
        probe = ObjectStoreProbe()
        # The probe must see what is put: 64 MiB in, its reading out.
        import numpy as np

        before = probe.used()
        ref = ray.put(np.ones(64 * MIB, dtype=np.uint8))
        probe_check = (probe.used() - before) / MIB
        del ref
        # Unrecorded passes over 1x (transform, a short tune, transform again), so that no size
        # pays first-use costs: worker start-up and imports, Ray Data's first plan, and the
        # workers Ray starts again after Tune's actors exit. Measured, they doubled 1x.
        warm_args = argparse.Namespace(**{**vars(args), "pandas_max_size": 0, "rounds": 30})
        _, warm_features = measure_transform(1, lake, warm_args, probe)
        measure_tune({}, warm_features, warm_args, probe)
        measure_transform(1, lake, warm_args, probe)
        # All transforms, then all searches: each stage runs after one of its own kind.
        measured = [measure_transform(size, lake, args, probe) for size in sizes]
        for row, features in measured:
            measure_tune(row, features, args, probe)
        rows = [row for row, _ in measured]
        ray.shutdown()
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)

    out = [
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        f"Ray CPUs: {cpus}; data built in {build_s:.0f}s; sizes {sizes}; seed {args.seed}; "
        f"op reservation {'on' if args.op_reservation else 'off'}; "
        f"object-store probe read a 64 MiB put as {probe_check:.0f} MiB",
        table(rows, args),
    ]
    print("\n".join(out))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "build_s": build_s}, indent=2))


if __name__ == "__main__":
    main()
