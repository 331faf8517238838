"""Real servers the deployment tests start the way the README tells users to start them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, ClassVar

import httpx

from mlops.runtime import free_port

BIN = Path(sys.executable).parent


class Process:
    """A subprocess with its output in a log file, stopped with its whole process group."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.log_tail()}")

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def wait_http(url: str, proc: Process, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check_alive()
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{proc.name} did not answer {url} within {timeout:.0f}s")


@contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (the way s3fs's own tests run); servers in one process
    share moto's store."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


# Ports that Serve's HAProxy ingress binds besides the Serve port (8404, 9101, 8500 by default).
SERVE_SIDE_PORTS = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
)


def base_env(**extra: str) -> dict[str, str]:
    """This process's environment without the test session's own Prefect and mlops state.

    A flow run started from it may start its own Ray and Serve beside the session's: its
    HAProxy gets its own side ports, not the session's.
    """
    own = ("PYTEST_", "PREFECT_", "MLOPS_", "MLFLOW_", "RAY_ADDRESS")  # mlflow exports its URI
    env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
    env.update({name: str(free_port()) for name in SERVE_SIDE_PORTS})
    env.update(extra)
    return env


@contextmanager
def prefect_server(home: Path, database_url: str | None = None) -> Iterator[str]:
    """`prefect server start` (with its services: scheduler, triggers) on a free port."""
    port = free_port()
    env = base_env(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
    )
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = Process("prefect-server", cmd, env, home)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", proc)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        proc.stop()


@contextmanager
def prefect_worker(pool: str, env: dict[str, str], log_dir: Path) -> Iterator[Process]:
    """`prefect worker start --pool POOL`, polling often so that tests do not wait 10 s a run."""
    env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
    cmd = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]
    proc = Process(f"worker-{pool}", cmd, env, log_dir)
    try:
        yield proc
    finally:
        proc.stop()


def kill_tree_matching(marker: str, grace: float = 3) -> None:
    """Stop every process whose command line names ``marker``, with their children.

    ``ray stop`` would also stop every other Ray on the machine (another test session's, say).
    Each gets SIGTERM, then SIGKILL after ``grace`` seconds: a throwaway test cluster keeps
    nothing worth a longer wait (Ray's agents take 10 s or more to honour SIGTERM). A process
    that exited but is not yet reaped (a zombie: its parent is gone) counts as stopped.
    """
    import psutil

    found = [
        p
        for p in psutil.process_iter(["cmdline"])
        if any(marker in part for part in (p.info["cmdline"] or []))
    ]
    procs = set(found)
    for p in found:
        try:
            procs.update(p.children(recursive=True))
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass

    def running(p: psutil.Process) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    deadline = time.monotonic() + grace
    alive = [p for p in procs if running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if running(p)]
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    deadline = time.monotonic() + 10
    while alive and time.monotonic() < deadline:  # SIGKILL is not instant either
        time.sleep(0.05)
        alive = [p for p in alive if running(p)]


def ray_node_args(temp_dir: str, gpus: int, cpus: int, index: int) -> list[str]:
    ports = [free_port() for _ in range(5)]
    workers = 31000 + 200 * index
    return [
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={cpus}",
        f"--num-gpus={gpus}",
        "--object-store-memory=400000000",
        "--disable-usage-stats",
        f"--node-manager-port={ports[0]}",
        f"--object-manager-port={ports[1]}",
        f"--dashboard-agent-listen-port={ports[2]}",
        f"--metrics-export-port={ports[3]}",
        f"--runtime-env-agent-port={ports[4]}",
        f"--min-worker-port={workers}",
        f"--max-worker-port={workers + 199}",
    ]


@contextmanager
def ray_cluster(env: dict[str, str], cpus_per_node: int = 2) -> Iterator[str]:
    """A head node and a worker node that declares one GPU, as `ray start` processes.

    Each node gets its own ports; the cluster its own temp dir (so it is found and stopped by
    that, not by ``ray stop``). Returns the head's GCS address for ``RAY_ADDRESS``.
    """
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: socket paths have a limit
    port = free_port()
    ray = str(BIN / "ray")
    head = [ray, "start", "--head", f"--port={port}", "--include-dashboard=false"]
    head += [f"--ray-client-server-port={free_port()}"]
    worker = [ray, "start", f"--address=127.0.0.1:{port}"]
    try:
        for cmd in (
            head + ray_node_args(temp_dir, gpus=0, cpus=cpus_per_node, index=0),
            worker + ray_node_args(temp_dir, gpus=1, cpus=cpus_per_node, index=1),
        ):
            # The nodes may start while another module's work holds both cores: give the
            # raylet longer than Ray's default to register (it timed out once under that load).
            node_env = {**env, "RAY_raylet_start_wait_time_s": "180"}
            done = subprocess.run(cmd, env=node_env, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{done.stderr[-2000:]}")
        yield f"127.0.0.1:{port}"
    finally:
        kill_tree_matching(temp_dir)


@contextmanager
def mlflow_server(
    backend_uri: str, artifacts: str, env: dict[str, str], log_dir: Path
) -> Iterator[str]:
    """`mlflow server` on PostgreSQL, proxying artifacts to S3."""
    port = free_port()
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        artifacts,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    proc = Process("mlflow-server", cmd, env, log_dir)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=180)
        yield f"http://127.0.0.1:{port}"
    finally:
        # Its state is committed in PostgreSQL; a graceful stop waits on idle keep-alive
        # connections (20 s, then SIGKILL anyway, when the cluster's clients went first).
        proc.stop(timeout=3)


@contextmanager
def prefect_client(api_url: str) -> Iterator[Any]:
    """A Prefect client for ``api_url`` (this test process's default API is the session's)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        yield client


def run_deployment_on_a_worker(
    name: str, params: dict[str, Any], env: dict[str, str], log_dir: Path, timeout: float
) -> Any:
    """`prefect deployment run NAME --param k=v ...`, then a process worker runs it to the end.

    The worker starts while the CLI creates the run (each spends seconds importing Prefect).
    Returns the flow run as the server holds it once it reached a final state.
    """
    args = [a for k, v in params.items() for a in ("--param", f"{k}={v}")]
    with prefect_client(env["PREFECT_API_URL"]) as client:
        pool = str(client.read_deployment_by_name(name).work_pool_name)
    with prefect_worker(pool, env, log_dir) as worker:
        started = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", name, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert started.returncode == 0, started.stderr
        run_id = next(
            line.split("UUID:")[1].strip()
            for line in started.stdout.splitlines()
            if "UUID:" in line
        )
        deadline = time.monotonic() + timeout
        with prefect_client(env["PREFECT_API_URL"]) as client:
            assert str(client.read_flow_run(run_id).work_pool_name) == pool
            while True:
                flow_run = client.read_flow_run(run_id)
                if flow_run.state.is_final() or time.monotonic() > deadline:
                    break
                worker.check_alive()
                time.sleep(0.25)
        assert flow_run.state.is_completed(), f"{flow_run.state!r}\n{worker.log_tail(60)}"
    return flow_run


@contextmanager
def started_together(*managers: AbstractContextManager[Any]) -> Iterator[list[Any]]:
    """Enter independent context managers at once, one thread each, and exit them likewise.

    Servers spend most of their start-up waiting (on imports, migrations, each other's ports),
    so starting them side by side takes about as long as the slowest one alone.
    """
    with ThreadPoolExecutor(len(managers)) as pool:
        entering = [pool.submit(m.__enter__) for m in managers]
    entered = [m for m, f in zip(managers, entering, strict=True) if f.exception() is None]
    try:
        for f in entering:
            if f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        yield [f.result() for f in entering]
    finally:
        with ThreadPoolExecutor(max(1, len(entered))) as pool:
            exiting = [pool.submit(m.__exit__, None, None, None) for m in entered]
        for f in exiting:
            f.result()


class EarlyStart:
    """Servers a module needs, started in a background thread while the module before it runs.

    A module registers a factory with :func:`start_early`; the integration conftest begins it
    when the module that precedes it in the run starts; the module's fixture takes it over with
    :func:`early_or_now` (which starts it then and there when nothing began it, e.g. a module run
    on its own). Whatever is still open when the session ends is closed then.
    """

    factories: ClassVar[dict[str, Any]] = {}
    begun: ClassVar[dict[str, EarlyStart]] = {}

    def __init__(self, manager: AbstractContextManager[Any]) -> None:
        import threading

        self.manager = manager
        self.value: Any = None
        self.error: BaseException | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._enter, daemon=True)
        self.thread.start()

    def _enter(self) -> None:
        try:
            self.value = self.manager.__enter__()
        except BaseException as exc:  # pytest.skip's exception too: re-raised in the fixture
            self.error = exc

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.thread.join()
        if self.error is None:
            self.manager.__exit__(None, None, None)


def start_early(module: str, factory: Any) -> None:
    """Register ``factory`` (no arguments, returns a context manager) for ``module``."""
    EarlyStart.factories[module] = factory


def begin_early(module: str) -> None:
    if module in EarlyStart.factories and module not in EarlyStart.begun:
        EarlyStart.begun[module] = EarlyStart(EarlyStart.factories[module]())


@contextmanager
def early_or_now(module: str) -> Iterator[Any]:
    """The module's early-started servers (waiting for their start-up to end), or new ones."""
    begin_early(module)
    early = EarlyStart.begun[module]
    try:
        early.thread.join()
        if early.error is not None:
            raise early.error
        yield early.value
    finally:
        early.close()


def close_early() -> None:
    for early in EarlyStart.begun.values():
        early.close()
