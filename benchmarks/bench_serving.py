"""Ray Serve application against a bare FastAPI + uvicorn server, same model, same load generator.

    make bench-serving            # uses MLOPS_HOME (default .mlops) after `make run`

Measures, for each server in one run: single-row latency p50/p99 at a fixed request rate (open
loop), maximum single-row throughput (closed loop, several clients) and batched scoring of
1,000-row requests. Loopback only; every phase is bounded in requests and time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


async def open_loop(url: str, body: list, rate: float, seconds: float) -> dict:
    """Send at a fixed rate regardless of answers; latency per request."""
    lat: list[float] = []
    errors = 0
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as client:

        async def one() -> None:
            nonlocal errors
            t = time.perf_counter()
            try:
                r = await client.post(url, json=body)
                if r.status_code != 200:
                    errors += 1
            except httpx.HTTPError:
                errors += 1
            lat.append((time.perf_counter() - t) * 1000)

        start = time.perf_counter()
        tasks = []
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    a = np.array(lat)
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "errors": errors,
        "n": len(a),
    }


async def closed_loop(url: str, body: list, clients: int, seconds: float) -> dict:
    """As fast as the server answers: requests/s and rows/s."""
    done = errors = 0
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as c:

        async def worker() -> None:
            nonlocal done, errors
            while time.perf_counter() < stop:
                try:
                    r = await c.post(url, json=body)
                    done += r.status_code == 200
                    errors += r.status_code != 200
                except httpx.HTTPError:
                    errors += 1

        t = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(clients)])
        elapsed = time.perf_counter() - t
    return {"rps": done / elapsed, "rows_per_s": done * len(body) / elapsed, "errors": errors}


def measure(url: str, one: list, batch: list, args: argparse.Namespace) -> dict:
    for _ in range(20):  # warm up
        httpx.post(url, json=one, timeout=30)
    return {
        "fixed": asyncio.run(open_loop(url, one, args.rate, args.seconds)),
        "single": asyncio.run(closed_loop(url, one, args.clients, args.seconds)),
        "batch": asyncio.run(closed_loop(url, batch, 2, args.seconds)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()

    import ray

    from mlops.runtime import free_port, ray_init_kwargs
    from mlops.settings import load_settings
    from tasks.ingest import partition_path
    from tasks.promote import serve_champion, to_requests

    settings = load_settings(serve_port=free_port())
    kwargs = ray_init_kwargs(settings, None)
    ray.init(kwargs.pop("address", None), **kwargs)
    state = serve_champion(settings)
    version = state.primary_model.version
    from mlops.storage import Storage

    storage = Storage(settings.storage_root, settings.storage_options)
    day = sorted(storage.ls_dirs("raw/flights"))[-1].removeprefix("date=")
    rows = to_requests(storage.read_parquet(partition_path("flights", day)).to_pandas())
    one, batch = rows[:1], (rows * (1000 // len(rows) + 1))[:1000]

    port = free_port()
    bare = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bare_server.py"),
            "--port",
            str(port),
            "--version",
            version,
        ],
        cwd=ROOT,
        env=os.environ.copy(),
    )
    try:
        bare_url = f"http://127.0.0.1:{port}/predict"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.post(bare_url, json=[], timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("bare server did not start")
            time.sleep(0.5)
        serve_res = measure(f"{settings.serve_url}/predict", one, batch, args)
        bare_res = measure(bare_url, one, batch, args)
    finally:
        bare.terminate()
        bare.wait(timeout=10)
        ray.shutdown()

    print(
        f"model version {version}; {os.cpu_count()} CPUs; rate {args.rate:.0f}/s for "
        f"{args.seconds:.0f}s; {args.clients} clients"
    )
    print(f"{'figure':<34}{'Ray Serve':>12}{'bare':>12}{'ratio':>8}")
    lines = [
        (
            "single-row p50 ms @ fixed rate",
            serve_res["fixed"]["p50_ms"],
            bare_res["fixed"]["p50_ms"],
        ),
        (
            "single-row p99 ms @ fixed rate",
            serve_res["fixed"]["p99_ms"],
            bare_res["fixed"]["p99_ms"],
        ),
        ("single-row throughput req/s", serve_res["single"]["rps"], bare_res["single"]["rps"]),
        (
            "1000-row batches rows/s",
            serve_res["batch"]["rows_per_s"],
            bare_res["batch"]["rows_per_s"],
        ),
    ]
    for name, a, b in lines:
        print(f"{name:<34}{a:>12.1f}{b:>12.1f}{a / b:>8.2f}")
    errs = {k: (serve_res[k]["errors"], bare_res[k]["errors"]) for k in serve_res}
    print(f"errors (serve, bare): {errs}")


if __name__ == "__main__":
    main()
