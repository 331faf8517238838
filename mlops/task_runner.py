"""The flows' task runner: prefect-ray's RayTaskRunner, configured when the flow starts."""

from __future__ import annotations

from typing import Any

from prefect_ray import RayTaskRunner

from mlops.runtime import drain_prefect_logs, ray_init_kwargs
from mlops.settings import load_settings


def current_prefect_api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


class MlopsRayTaskRunner(RayTaskRunner):
    """RayTaskRunner that resolves its cluster and worker environment when the flow starts.

    Reusing an already-initialised Ray (the CLI starts it in parallel with the Prefect API) keeps
    it alive after the flow; otherwise Ray is started here from the settings and stopped at exit.
    """

    def __enter__(self) -> MlopsRayTaskRunner:
        import ray

        if not ray.is_initialized():
            settings = load_settings()
            kwargs = ray_init_kwargs(settings, current_prefect_api_url())
            address = kwargs.pop("address", None)
            if address == "local":
                self.address, kwargs["address"] = None, address  # logged as a new instance
            else:
                self.address = address
            self.init_kwargs = kwargs
        return super().__enter__()

    @staticmethod
    def _run_prefect_task(*upstream_ray_obj_refs: Any, **kwargs: Any) -> Any:
        """Run the task in the Ray worker, then ship its buffered logs before returning.

        Prefect sends logs in background batches; a worker whose Ray session ends right after
        the flow would otherwise lose the last ones (including the task's final state).
        """
        try:
            return RayTaskRunner._run_prefect_task(*upstream_ray_obj_refs, **kwargs)
        finally:
            drain_prefect_logs()
