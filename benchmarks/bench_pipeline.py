"""Time the main job and the plain baseline side by side, in one run, on the same machine.

    make bench                       # full year, 8 trials
    make bench ARGS="--trials 4"

Both run as fresh processes on fresh state: the baseline (benchmarks/baseline.py), then
`mlops run` with embedded defaults. Prints per-stage and total seconds and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = [
    ("ingest", "ingest_partitions", "ingest"),
    ("validate", "validate_partitions", "validate"),
    ("transform", "build_feature_set", "transform"),
    ("tune", "tune_hyperparameters", "tune"),
    ("register", "register_model", "register"),
    ("gate", "evaluate_challenger", None),
    ("serve + predict", "promote_model", "predict"),
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_baseline(work: Path, trials: int) -> tuple[float, dict]:
    t = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "baseline.py"),
            "--trials",
            str(trials),
            "--workdir",
            str(work / "baseline"),
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    wall = time.perf_counter() - t
    return wall, json.loads(out.stdout.strip().splitlines()[-1])


def run_pipeline(work: Path, trials: int) -> tuple[float, dict]:
    env = {**os.environ, "MLOPS_HOME": str(work / "pipeline"), "MLOPS_SERVE_PORT": str(free_port())}
    for var in ("PREFECT_API_URL", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLOPS_STORAGE_ROOT"):
        env.pop(var, None)
    summary = work / "pipeline.json"
    t = time.perf_counter()
    subprocess.run(
        [
            str(Path(sys.executable).parent / "mlops"),
            "run",
            "--trials",
            str(trials),
            "--summary-json",
            str(summary),
        ],
        check=True,
        env=env,
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - t
    return wall, json.loads(summary.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlops-bench-") as tmp:
        work = Path(tmp)
        base_wall, base = run_baseline(work, args.trials)
        pipe_wall, pipe = run_pipeline(work, args.trials)
    stages = pipe["stage_seconds"]
    rows = []
    for label, task, base_key in STAGES:
        p = stages.get(task, 0.0)
        b = base["stages"].get(base_key, 0.0) if base_key else 0.0
        rows.append((label, p, b))
    overhead_p = pipe_wall - sum(r[1] for r in rows)
    overhead_b = base_wall - sum(r[2] for r in rows)
    rows.append(("start-up, imports, orchestration", overhead_p, overhead_b))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(f"trials: {args.trials}; rows used: {sum(pipe['features']['rows'].values())}")
    print(f"{'stage':<34}{'pipeline s':>12}{'baseline s':>12}")
    for label, p, b in rows:
        print(f"{label:<34}{p:>12.1f}{b:>12.1f}")
    print(f"{'total (wall)':<34}{pipe_wall:>12.1f}{base_wall:>12.1f}")
    print(f"ratio pipeline/baseline: {pipe_wall / base_wall:.2f}")
    print(
        f"best valid AUC: pipeline {pipe['tune']['best_metric']:.4f}, "
        f"baseline {base['best_valid_auc']:.4f}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"rows": rows, "pipeline_wall": pipe_wall, "baseline_wall": base_wall}, indent=2
            )
        )


if __name__ == "__main__":
    main()
