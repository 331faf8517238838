"""What the code asks Ray for, stage by stage, read from the code itself.

The cluster manifests under ``deployments/k8s`` are sized from these figures and a test checks
that they still agree: a Tune trial's bundle (``tasks.tune.trial_resources``), a Serve replica's
``ray_actor_options`` (``serving.app.build_app``), a Ray Data transform task and a plain
Prefect task on the ``RayTaskRunner``. Nothing runs at import; Ray is never started.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlops.settings import Settings
from serving.state import MODEL_MAX_REPLICAS, SLOTS, SlotModel

Resources = dict[str, float]


def ray_resources(options: Mapping[str, Any]) -> Resources:
    """Ray option names (``num_cpus``, ``num_gpus``) as resource names (``CPU``, ``GPU``)."""
    names = {"num_cpus": "CPU", "num_gpus": "GPU"}
    return {names[k]: float(v) for k, v in options.items() if k in names and v}


def default_budget(settings: Settings) -> Any:
    """The Tune budget the training flow builds by default (flows/training.py)."""
    from tasks.tune import TuneBudget

    return TuneBudget(gpus_per_trial=settings.tune_gpus_per_trial)


def tune_trial_asks(settings: Settings, budget: Any = None) -> dict[str, Resources]:
    """One trial's resources, by accelerator ("gpu" and "cpu"), from ``trial_resources``."""
    from tasks.tune import ACCELERATOR, trial_resources

    budget = budget if budget is not None else default_budget(settings)
    asks = {}
    for accelerator in ("gpu", "cpu"):
        bundles = trial_resources({ACCELERATOR: accelerator}, budget).bundles
        if len(bundles) != 1:  # one bundle is one node; several could span nodes
            raise ValueError(f"a trial asks for {len(bundles)} bundles; sizing expects one")
        asks[accelerator] = {k: float(v) for k, v in bundles[0].items() if v}
    return asks


def serve_replica_asks(settings: Settings, on_gpu_cluster: bool = True) -> dict[str, Resources]:
    """A model replica's and a router replica's resources, from the application the code builds."""
    from serving.app import build_app, model_config

    slot = SlotModel(version="1", run_id="sizing", dims_uri="sizing")
    cfg = model_config(settings, slot, use_gpu=on_gpu_cluster)
    router = build_app(dict.fromkeys(SLOTS, cfg), {})._bound_deployment
    model = router.init_args[0]._bound_deployment
    return {
        "model": ray_resources(model.ray_actor_options),
        "router": ray_resources(router.ray_actor_options),
    }


def transform_task_ask() -> Resources:
    """A Ray Data map task of the transform: it names no resources, so Ray Data's default."""
    from ray.data._internal.execution.operators.map_operator import (
        _canonicalize_ray_remote_args,
    )

    return ray_resources(_canonicalize_ray_remote_args({}))


def prefect_task_ask() -> Resources:
    """A Prefect task outside ``remote_options(...)`` (ingest, validate, register, gate).

    The RayTaskRunner submits it as a Ray task that names no resources: Ray's task default.
    """
    from ray._common.ray_option_utils import task_options

    return ray_resources({"num_cpus": task_options["num_cpus"].default_value})


def fits(ask: Mapping[str, float], node: Mapping[str, float]) -> bool:
    """True when one node's resources hold the ask."""
    return all(node.get(name, 0.0) + 1e-9 >= amount for name, amount in ask.items())


@dataclass(frozen=True)
class NodeNeeds:
    """The smallest node of a worker group that holds what may be placed on it at once."""

    cpus: float
    gpus: int

    def as_resources(self) -> Resources:
        return {"CPU": self.cpus, "GPU": float(self.gpus)} if self.gpus else {"CPU": self.cpus}


def gpu_node_needs(settings: Settings, budget: Any = None) -> NodeNeeds:
    """A GPU worker must hold a GPU trial and every model replica at the autoscaling ceiling.

    Serve may place all model replicas on one GPU node, and the trials count on a whole GPU
    besides them (``tasks.tune`` subtracts the serving reserve before it hands out GPU slots).
    A trial asking for whole GPUs cannot share a device with fractional replicas, so the
    replicas' GPU shares round up to devices of their own.
    """
    trial = tune_trial_asks(settings, budget)["gpu"]
    model = serve_replica_asks(settings)["model"]
    replicas = len(SLOTS) * MODEL_MAX_REPLICAS
    trial_gpus, serve_gpus = trial.get("GPU", 0.0), replicas * model.get("GPU", 0.0)
    if trial_gpus >= 1:
        gpus = math.ceil(trial_gpus - 1e-9) + math.ceil(serve_gpus - 1e-9)
    else:
        gpus = math.ceil(trial_gpus + serve_gpus - 1e-9)
    cpus = trial.get("CPU", 0.0) + replicas * model.get("CPU", 0.0)
    return NodeNeeds(cpus=cpus, gpus=gpus)


def cpu_node_needs(settings: Settings, budget: Any = None) -> NodeNeeds:
    """A CPU worker must hold the largest single CPU-only ask (a trial, a task, a router)."""
    asks = [
        tune_trial_asks(settings, budget)["cpu"],
        transform_task_ask(),
        prefect_task_ask(),
        serve_replica_asks(settings)["router"],
    ]
    return NodeNeeds(cpus=max(a.get("CPU", 0.0) for a in asks), gpus=0)
