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
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


def prepare_process(settings: Settings) -> Settings:
    """Set the environment Prefect must see before it is imported; pick the local API's port.

    Without a configured ``PREFECT_API_URL``, one local API will be started by :func:`runtime`;
    its URL is put in the environment now. Returns the settings as they now read.
    """
    settings.home.mkdir(parents=True, exist_ok=True)
    for key, value in prefect_env(settings).items():
        os.environ.setdefault(key, value)
    if not settings.prefect_api_url:
        os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{free_port()}/api"
        os.environ["MLOPS_EMBEDDED_PREFECT"] = "1"
    return load_settings()


@contextmanager
def runtime(settings: Settings) -> Iterator[Runtime]:
    """Start what the settings do not point at (Ray, a Prefect API), overlapping their start-up.

    Call :func:`prepare_process` first, before anything imports Prefect.
    """
    import ray

    owns_prefect = settings.embedded_prefect
    api_url = settings.prefect_api_url
    if not api_url:
        raise RuntimeError("prepare_process() must run before runtime()")
    server = None
    errors: list[BaseException] = []

    def start_prefect() -> None:
        nonlocal server
        try:
            from prefect.server.api.server import SubprocessASGIServer

            server = SubprocessASGIServer(port=int(api_url.rsplit(":", 1)[1].split("/")[0]))
            server.start(timeout=120)
        except BaseException as exc:
            errors.append(exc)

    def open_tracking_store() -> None:
        # Creating a fresh SQLite store runs MLflow's migrations (seconds): do it while Ray starts.
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(settings.mlflow_tracking_uri).search_experiments(max_results=1)
        except Exception as exc:  # the stage that needs MLflow reports it properly
            log.warning("MLflow tracking store not ready yet: %s", exc)

    thread = threading.Thread(target=start_prefect, name="prefect-api", daemon=True)
    if owns_prefect:
        thread.start()
    mlflow_thread = threading.Thread(target=open_tracking_store, name="mlflow", daemon=True)
    if settings.mlflow_tracking_uri.startswith("sqlite:"):
        mlflow_thread.start()
    owns_ray = not ray.is_initialized()
    try:
        if owns_ray:
            kwargs = ray_init_kwargs(settings, api_url)
            ray.init(kwargs.pop("address", None), **kwargs)
        if mlflow_thread.is_alive():
            mlflow_thread.join()
        if owns_prefect:
            thread.join()
            if errors:
                raise RuntimeError(f"could not start the local Prefect API: {errors[0]}")
        yield Runtime(settings, api_url, owns_ray, owns_prefect)
    finally:
        if owns_prefect and not errors:
            from mlops.task_runner import drain_prefect_logs

            drain_prefect_logs()  # before the local API goes away
        if owns_ray and ray.is_initialized():
            ray.shutdown()
        if server is not None:
            server.stop()
