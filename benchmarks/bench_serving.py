"""Ray Serve application against a bare FastAPI + uvicorn server, same model, same load generator.

    make bench-serving            # uses MLOPS_HOME (default .mlops) after `make run`

Measures, for each server in one run: single-row latency p50/p99 at a fixed request rate (open
loop), maximum single-row throughput (closed loop, several clients) and batched scoring of
1,000-row requests. Loopback only; every phase is bounded in requests and time.

The load generator shares the machine's cores with the server it measures, so it is kept lean
and identical for both servers: raw HTTP/1.1 over asyncio keep-alive connections, each request
encoded once before the clock starts, answers read by Content-Length and not decoded. (An httpx
client spent more CPU per request than the servers did.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


class Connection:
    """One keep-alive HTTP/1.1 connection that sends pre-encoded requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def send(self, request: bytes) -> int:
        """Send one request; returns the status once the whole answer is read."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = dict(line.split(b":", 1) for line in lines[1:] if b":" in line)
        headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
        if b"content-length" in headers:
            await self.reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        return status

    def close(self) -> None:
        self.writer.close()


def encode_post(url: str, body: object) -> tuple[str, int, bytes]:
    """(host, port, the whole request as bytes) for a JSON POST."""
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return parts.hostname or "127.0.0.1", parts.port or 80, head.encode() + payload


async def open_loop(url: str, body: list, rate: float, seconds: float) -> dict:
    """Send at a fixed rate regardless of answers; latency per request from its scheduled time.

    Timing from the schedule, not from the send, keeps a stalled server from hiding its queue.
    """
    host, port, request = encode_post(url, body)
    idle: list[Connection] = []
    lat: list[float] = []
    errors = 0

    async def one(scheduled: float) -> None:
        nonlocal errors
        conn = idle.pop() if idle else await Connection.open(host, port)
        try:
            if await conn.send(request) != 200:
                errors += 1
            idle.append(conn)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            conn.close()
        lat.append((time.perf_counter() - scheduled) * 1000)

    for _ in range(8):  # connections opened before the clock starts
        idle.append(await Connection.open(host, port))
    start = time.perf_counter()
    tasks = []
    for i in range(int(rate * seconds)):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    for conn in idle:
        conn.close()
    a = np.array(lat)
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "errors": errors,
        "n": len(a),
    }


async def closed_loop(url: str, body: list, clients: int, seconds: float) -> dict:
    """As fast as the server answers: requests/s and rows/s."""
    host, port, request = encode_post(url, body)
    done = errors = 0
    conns = [await Connection.open(host, port) for _ in range(clients)]
    stop = time.perf_counter() + seconds

    async def worker(conn: Connection) -> None:
        nonlocal done, errors
        while time.perf_counter() < stop:
            try:
                ok = await conn.send(request) == 200
                done += ok
                errors += not ok
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                conn.close()
                conn = await Connection.open(host, port)

    t = time.perf_counter()
    await asyncio.gather(*[worker(c) for c in conns])
    elapsed = time.perf_counter() - t
    for conn in conns:
        conn.close()
    return {"rps": done / elapsed, "rows_per_s": done * len(body) / elapsed, "errors": errors}


async def warm_up(url: str, body: list, n: int = 50) -> None:
    host, port, request = encode_post(url, body)
    conn = await Connection.open(host, port)
    for _ in range(n):
        await conn.send(request)
    conn.close()


def measure(url: str, one: list, batch: list, args: argparse.Namespace) -> dict:
    import uvloop  # the cheapest event loop for the generator, the same for both servers

    uvloop.run(warm_up(url, one))
    uvloop.run(warm_up(url, batch, 5))
    return {
        "fixed": uvloop.run(open_loop(url, one, args.rate, args.seconds)),
        "single": uvloop.run(closed_loop(url, one, args.clients, args.seconds)),
        "batch": uvloop.run(closed_loop(url, batch, 2, args.seconds)),
    }


def wait_for_in_process_scoring(base_url: str, timeout_s: float = 120.0) -> None:
    """Measure the steady state: every router replica scores the primary in-process.

    Router replicas load the primary's model in the background after they start; until then
    they forward to the slot deployment. Twenty /healthz answers in a row reach every replica.
    """
    import httpx

    deadline, streak = time.monotonic() + timeout_s, 0
    while streak < 20:
        if time.monotonic() > deadline:
            raise RuntimeError("the router replicas did not load the primary's model in time")
        ok = httpx.get(f"{base_url}/healthz", timeout=10).json().get("scored_by") == "router"
        streak = streak + 1 if ok else 0
        if not ok:
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()

    import httpx
    import ray

    from mlops.lake import partition_path
    from mlops.runtime import free_port, ray_init_kwargs
    from mlops.schema import to_requests
    from mlops.settings import load_settings
    from serving.control import serve_champion

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
        wait_for_in_process_scoring(settings.serve_url)
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
