"""Start-up of the execution runtime: Ray and the Prefect API, in parallel, each paid once.

Nothing here imports Prefect at module level: Prefect reads its settings once, at import, so the
environment it must see (``PREFECT_HOME``, ``PREFECT_API_URL``) is set first.

Embedded mode (no ``RAY_ADDRESS`` / ``PREFECT_API_URL``) starts a local Ray and one temporary
Prefect API for the run, and hands that API's URL to every Ray worker. Without that, each worker
would start its own temporary server: measured here, 2.5x slower, and its logs would be lost.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlops.settings import Settings, load_settings

log = logging.getLogger(__name__)

# Locations the workers must share with the driver. Credentials are not forwarded: on a cluster
# each node gets them from its own environment or instance role.
_FORWARDED = (
    "MLOPS_STORAGE_ROOT",
    "MLOPS_MLFLOW_ARTIFACT_ROOT",
    "MLOPS_MODEL_NAME",
    "MLOPS_SERVE_PORT",
    "MLOPS_SERVE_HOST",
    "MLOPS_EXPERIMENT_NAME",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "PREFECT_TASKS_REFRESH_CACHE",
    "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK",
)


def prefect_env(settings: Settings) -> dict[str, str]:
    """Prefect settings every process of a run shares (set before Prefect is imported)."""
    return {
        "PREFECT_HOME": str(settings.prefect_home),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(settings.prefect_home / "results"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LOG_PRINTS": "false",
    }


# Ray Serve reads these when each of its processes imports it. They go into the Serve controller's
# runtime environment, which the HAProxy manager and every replica it starts inherit
# (`ensure_serve`; `controller_options` in deployments/serve_config.yaml). Measured on 2 cores
# against Serve's Python proxy: benchmarks/README.md.
SERVE_HAPROXY_ENV = {
    # HAProxy listens on the Serve port and forwards to the router replicas, each of which runs
    # its own HTTP server: no Python proxy and no Ray call on the request path.
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # User code and request routing on each replica's own event loop, gRPC between
    # deployments, buffered request logs, the garbage collector frozen after start-up.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # Request metrics come from the router; HAProxy's per-request log parsing in Python is off.
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",  # one thread forwards thousands of requests/s
}


def serve_env(settings: Settings) -> dict[str, str]:
    """Ray Serve's environment for the configured ingress; an operator's RAY_SERVE_* win."""
    env = dict(SERVE_HAPROXY_ENV) if settings.serve_ingress == "haproxy" else {}
    env.update({k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")})
    return env


def worker_env(settings: Settings, prefect_api_url: str | None) -> dict[str, str]:
    env = {
        **prefect_env(settings),
        "MLOPS_HOME": str(settings.home),
        "MLOPS_STORAGE_ROOT": settings.storage_root,
        "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
    }
    env.update({k: os.environ[k] for k in _FORWARDED if k in os.environ})
    if prefect_api_url:
        env["PREFECT_API_URL"] = prefect_api_url
    return env


def ray_init_kwargs(settings: Settings, prefect_api_url: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "namespace": "mlops",
        "runtime_env": {"env_vars": worker_env(settings, prefect_api_url)},
        "logging_level": logging.WARNING,
    }
    if settings.ray_address:
        kwargs["address"] = settings.ray_address
    else:
        # A new local instance, never one that `ray start` left running on this machine.
        kwargs["address"] = "local"
        kwargs["include_dashboard"] = False
        if settings.ray_num_cpus:
            kwargs["num_cpus"] = settings.ray_num_cpus
    return kwargs


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Runtime:
    settings: Settings
    prefect_api_url: str
    owns_ray: bool
    owns_prefect: bool


class LocalPrefectApi:
    """One temporary Prefect API in a subprocess, run the way Prefect's own ephemeral mode runs it.

    It is launched without importing Prefect here, so its start-up (imports, database
    migrations: about 10 s on 2 cores) overlaps everything the caller does meanwhile.
    """

    def __init__(self, api_url: str, log_path: Path) -> None:
        self.api_url = api_url
        self.port = int(api_url.rsplit(":", 1)[1].split("/")[0])
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> LocalPrefectApi:
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--factory",
                    "prefect.server.api.server:create_app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--log-level",
                    "error",
                    "--lifespan",
                    "on",
                ],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise RuntimeError(f"the local Prefect API exited: {' '.join(tail)}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the local Prefect API did not answer within {timeout_s:.0f}s")

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


def prepare_process(
    settings: Settings, launch_api: bool = True
) -> tuple[Settings, LocalPrefectApi | None]:
    """Set the environment Prefect must see before it is imported, and launch the local API.

    Without a configured ``PREFECT_API_URL``, a local API is launched now (unless
    ``launch_api`` is false, then :func:`runtime` launches it) and its URL put in the
    environment. Returns the settings as they now read, and the launched API if any.
    """
    settings.home.mkdir(parents=True, exist_ok=True)
    for key, value in prefect_env(settings).items():
        os.environ.setdefault(key, value)
    api = None
    if not settings.prefect_api_url:
        url = f"http://127.0.0.1:{free_port()}/api"
        os.environ["PREFECT_API_URL"] = url
        os.environ["MLOPS_EMBEDDED_PREFECT"] = "1"
        if launch_api:
            api = LocalPrefectApi(url, settings.prefect_home / "server.log").launch()
    return load_settings(), api


# Imported by the warm-up tasks so that the first stages do not pay for them one after another.
# Heavy libraries the stages import, imported once per embedded worker while the Prefect API
# starts. The entry layer adds the stage modules themselves (the core never names them).
WARM_MODULES = (
    "prefect",
    "prefect_ray",
    "great_expectations",
    "mlflow.xgboost",
    "xgboost",
    "ray.data",
    "ray.tune",
)


def warm_worker(tracking_uri: str | None, modules: Sequence[str] = WARM_MODULES) -> None:
    """Import the stages' heavy libraries in a Ray worker; optionally create the MLflow store."""
    import importlib

    for name in modules:
        importlib.import_module(name)
    if tracking_uri:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri, registry_uri=tracking_uri).search_experiments(max_results=1)


@contextmanager
def runtime(
    settings: Settings,
    api: LocalPrefectApi | None = None,
    warm_modules: Sequence[str] = WARM_MODULES,
) -> Iterator[Runtime]:
    """Start what the settings do not point at (Ray, a Prefect API), overlapping their start-up.

    Call :func:`prepare_process` first, before anything imports Prefect. With an embedded Ray,
    one warm-up task per CPU imports the stages' libraries in the workers that will run them
    (and creates a fresh SQLite MLflow store) while the Prefect API starts.
    """
    import ray

    owns_prefect = settings.embedded_prefect
    api_url = settings.prefect_api_url
    if not api_url:
        raise RuntimeError("prepare_process() must run before runtime()")
    if owns_prefect and api is None:
        api = LocalPrefectApi(api_url, settings.prefect_home / "server.log").launch()
    owns_ray = not ray.is_initialized()
    ready = False
    try:
        if owns_ray:
            kwargs = ray_init_kwargs(settings, api_url)
            ray.init(kwargs.pop("address", None), **kwargs)
        warming = []
        if owns_ray and not settings.ray_address:
            sqlite = settings.mlflow_tracking_uri.startswith("sqlite:")
            cpus = max(1, min(2, int(ray.cluster_resources().get("CPU", 1))))
            remote = ray.remote(num_cpus=1, max_retries=0)(warm_worker)
            warming = [
                remote.remote(
                    settings.mlflow_tracking_uri if sqlite and i == 0 else None, warm_modules
                )
                for i in range(cpus)
            ]
        if api is not None:
            api.wait_ready()
        for ref in warming:
            try:
                ray.get(ref, timeout=180)
            except Exception as exc:  # warming is an optimisation; the stages report real errors
                log.warning("worker warm-up failed: %s", exc)
        ready = True
        yield Runtime(settings, api_url, owns_ray, owns_prefect)
    finally:
        if owns_prefect and ready:
            drain_prefect_logs()  # before the local API goes away
        if owns_ray and ray.is_initialized():
            ray.shutdown()
        if api is not None:
            api.stop()


def drain_prefect_logs() -> None:
    """Send Prefect's buffered logs now (a worker or API about to go away would lose them)."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)
