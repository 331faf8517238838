"""The Kubernetes manifests agree with what the code asks Ray for and with the settings it reads.

No cluster: the manifests are parsed, and the resource asks come from the code itself
(``cli.sizing``: Tune's ``trial_resources``, the Serve application's ``ray_actor_options``,
Ray Data's default for a map task), resolved with the settings a flow-run pod would see.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import AliasChoices

from cli import sizing
from mlops.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deployments" / "k8s"
RAYCLUSTER = yaml.safe_load((K8S / "raycluster.yaml").read_text())
CONFIG_MAP = yaml.safe_load((K8S / "mlops-config.yaml").read_text())
WORK_POOL = json.loads((K8S / "prefect-k8s-work-pool.json").read_text())
DOCKERFILE = (K8S / "Dockerfile").read_text()
MANIFEST_FILES = sorted(p for p in K8S.iterdir() if p.suffix in (".yaml", ".json"))

# Secrets are created by hand in the cluster (README, "Running on Kubernetes"); these are the
# names and keys the manifests may refer to.
SECRETS = {
    "ray-auth": {"RAY_AUTH_TOKEN"},
    "mlops-s3": {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
        "AWS_DEFAULT_REGION",
    },
}
# Variables read by libraries rather than by mlops/settings.py.
LIBRARY_ENV = {
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
}


def quantity(value: Any) -> float:
    """A Kubernetes resource quantity ("250m", "4", "16Gi", bytes) as a number."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6}
    units |= {"G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def settings_env_names() -> set[str]:
    """Every environment variable ``Settings`` reads (field names with the prefix, or aliases)."""
    prefix = Settings.model_config["env_prefix"]
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {c for c in alias.choices if isinstance(c, str)}
        elif isinstance(alias, str):
            names.add(alias)
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def groups() -> dict[str, dict[str, Any]]:
    spec = RAYCLUSTER["spec"]
    out = {"head": spec["headGroupSpec"]}
    out |= {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    return out


def container(group: dict[str, Any]) -> dict[str, Any]:
    containers = group["template"]["spec"]["containers"]
    assert len(containers) == 1, "one Ray container per pod"
    return containers[0]


def node_resources(group: dict[str, Any]) -> dict[str, float]:
    """What Ray hands out on one pod of a group (its rayStartParams)."""
    params = group["rayStartParams"]
    return {"CPU": float(params["num-cpus"]), "GPU": float(params.get("num-gpus", 0))}


def job_container() -> dict[str, Any]:
    manifest = WORK_POOL["job_configuration"]["job_manifest"]
    return manifest["spec"]["template"]["spec"]["containers"][0]


def variable_default(name: str) -> Any:
    return WORK_POOL["variables"]["properties"][name].get("default")


def flow_run_env() -> dict[str, dict[str, Any]]:
    """The flow-run pod's variables: Prefect's env (its default) and the container's list."""
    env = {k: {"name": k, "value": v} for k, v in (variable_default("env") or {}).items()}
    return env | {e["name"]: e for e in job_container()["env"]}


def all_env_lists() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    for name, group in groups().items():
        yield name, container(group)["env"]
    yield "autoscaler", RAYCLUSTER["spec"]["autoscalerOptions"]["env"]
    yield "flow-run", list(flow_run_env().values())


def resolved(entry: dict[str, Any]) -> str | None:
    """An env entry's value as the pod sees it (ConfigMap refs resolved, Secrets not)."""
    if "value" in entry:
        value = str(entry["value"])
        placeholder = re.fullmatch(r"\{\{\s*(\w+)\s*\}\}", value)
        return str(variable_default(placeholder.group(1))) if placeholder else value
    ref = entry["valueFrom"].get("configMapKeyRef")
    return CONFIG_MAP["data"][ref["key"]] if ref else None


@pytest.fixture(scope="module")
def cluster_settings() -> Iterator[Settings]:
    """Settings as the flow-run pod resolves them (the flow passes them to every task)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in settings_env_names():
            mp.delenv(name, raising=False)
        for name, entry in flow_run_env().items():
            value = resolved(entry)
            if value is not None:
                mp.setenv(name, value)
        yield Settings()


def test_ray_start_params_match_each_pods_container_resources() -> None:
    for name, group in groups().items():
        params, resources = group["rayStartParams"], container(group)["resources"]
        requests, limits = resources["requests"], resources["limits"]
        # The head's CPUs run Ray's own services; it hands none out (checked below).
        if name != "head":
            assert quantity(params["num-cpus"]) == quantity(limits["cpu"]), name
        assert quantity(requests["cpu"]) == quantity(limits["cpu"]) > 0, name
        assert int(params["memory"]) == quantity(limits["memory"]), name
        assert quantity(requests["memory"]) == quantity(limits["memory"]), name
        gpus = float(params.get("num-gpus", 0))
        assert gpus == float(limits.get("nvidia.com/gpu", 0)), name
        assert float(requests.get("nvidia.com/gpu", gpus)) == gpus, name


def test_the_head_takes_no_work_and_exposes_the_clusters_ports() -> None:
    head = groups()["head"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert float(head["rayStartParams"].get("num-gpus", 0)) == 0
    ports = {p["name"]: p["containerPort"] for p in container(head)["ports"]}
    assert {"gcs": 6379, "dashboard": 8265, "client": 10001}.items() <= ports.items()
    assert ports["serve"] == int(CONFIG_MAP["data"]["MLOPS_SERVE_PORT"])


def test_gpu_workers_are_on_gpu_nodes_and_always_there() -> None:
    gpu = groups()["gpu-workers"]
    assert node_resources(gpu)["GPU"] >= 1
    assert gpu["minReplicas"] >= 1 and gpu["replicas"] >= gpu["minReplicas"]
    spec = gpu["template"]["spec"]
    assert spec["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert node_resources(groups()["cpu-workers"])["GPU"] == 0


def test_a_gpu_trial_beside_every_model_replica_fits_on_one_gpu_worker(
    cluster_settings: Settings,
) -> None:
    node = node_resources(groups()["gpu-workers"])
    trial = sizing.tune_trial_asks(cluster_settings)["gpu"]
    model = sizing.serve_replica_asks(cluster_settings)["model"]
    assert trial["GPU"] == cluster_settings.tune_gpus_per_trial
    assert model["GPU"] == cluster_settings.serve_gpus_per_replica and model["CPU"] > 0
    assert sizing.fits(trial, node) and sizing.fits(model, node)
    assert sizing.fits(sizing.gpu_node_needs(cluster_settings).as_resources(), node)


def test_tune_gets_a_gpu_slot_with_the_serving_reserve_held_back(
    cluster_settings: Settings,
) -> None:
    from serving.state import serving_gpu_reserve
    from tasks.tune import gpu_slots

    gpu = groups()["gpu-workers"]
    cluster_gpus = gpu["minReplicas"] * node_resources(gpu)["GPU"]
    reserve = serving_gpu_reserve(cluster_settings.serve_gpus_per_replica)
    assert gpu_slots(sizing.default_budget(cluster_settings), cluster_gpus - reserve) >= 1


def test_cpu_only_work_fits_on_a_cpu_worker_and_gpu_trials_do_not(
    cluster_settings: Settings,
) -> None:
    node = node_resources(groups()["cpu-workers"])
    trials = sizing.tune_trial_asks(cluster_settings)
    for ask in (
        trials["cpu"],
        sizing.transform_task_ask(),
        sizing.prefect_task_ask(),
        sizing.serve_replica_asks(cluster_settings)["router"],
    ):
        assert "GPU" not in ask and sizing.fits(ask, node), ask
    assert sizing.fits(sizing.cpu_node_needs(cluster_settings).as_resources(), node)
    assert not sizing.fits(trials["gpu"], node)


def test_the_checks_fail_when_the_code_asks_for_more(cluster_settings: Settings) -> None:
    bigger = cluster_settings.model_copy(update={"tune_gpus_per_trial": 3.0})
    node = node_resources(groups()["gpu-workers"])
    assert not sizing.fits(sizing.tune_trial_asks(bigger)["gpu"], node)
    assert not sizing.fits(sizing.gpu_node_needs(bigger).as_resources(), node)
    on_cpu = sizing.serve_replica_asks(cluster_settings, on_gpu_cluster=False)["model"]
    assert "GPU" not in on_cpu and on_cpu["CPU"] > 0


def test_every_image_is_the_one_tag_built_for_the_locked_ray_version() -> None:
    lock = (ROOT / "requirements.lock").read_text()
    ray_version = re.search(r"^ray==([^\s\\]+)(?: \\)?$", lock, re.M).group(1)
    images = {container(g)["image"] for g in groups().values()}
    images.add(variable_default("image"))
    assert len(images) == 1, images
    tag = images.pop().rsplit(":", 1)[1]
    assert re.search(rf"(^|-)ray{re.escape(ray_version)}(-|$)", tag), tag
    assert RAYCLUSTER["spec"]["rayVersion"] == ray_version
    assert re.search(rf"^ARG RAY_VERSION={re.escape(ray_version)}$", DOCKERFILE, re.M)
    assert re.search(r"^FROM python:3\.11[-.\w]*$", DOCKERFILE, re.M)
    assert "-r requirements.lock" in DOCKERFILE and "--no-deps ." in DOCKERFILE


def test_the_image_installs_the_runtime_lock_only_with_hashes() -> None:
    lock = (ROOT / "requirements.lock").read_text()
    pinned = set(re.findall(r"^([a-z0-9][a-z0-9._-]*)==", lock, re.M))
    assert {"ray", "xgboost", "mlflow", "prefect"} <= pinned
    # No test or dev tools in the image; xgboost's NCCL is left out on purpose (single-GPU trials).
    assert not pinned & {"pytest", "moto", "ruff", "deptry", "import-linter", "nvidia-nccl-cu12"}
    assert lock.count("==") == len(pinned) and lock.count("--hash=sha256:") >= len(pinned)
    assert "--require-hashes" in DOCKERFILE and "requirements-dev.lock" not in DOCKERFILE


def test_the_work_pool_template_has_prefects_shape() -> None:
    from prefect.utilities.templating import find_placeholders

    assert set(WORK_POOL) == {"job_configuration", "variables"}
    variables = WORK_POOL["variables"]
    assert variables["type"] == "object"
    used = {p.name for p in find_placeholders(WORK_POOL["job_configuration"])}
    assert used <= set(variables["properties"]), used - set(variables["properties"])
    manifest = WORK_POOL["job_configuration"]["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    assert job_container()["name"] == "prefect-job"
    assert job_container()["args"] == "{{ command }}"


def test_flow_run_env_names_are_variables_the_code_reads() -> None:
    from deployments.deploy import PROJECT_DIR_VAR

    names = set(flow_run_env())
    known = settings_env_names() | LIBRARY_ENV | {PROJECT_DIR_VAR}
    assert names <= known, names - known
    required = {
        "PREFECT_API_URL",
        "RAY_ADDRESS",
        "MLFLOW_TRACKING_URI",
        "MLOPS_STORAGE_ROOT",
        "MLOPS_BACKUP_ROOT",
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "RAY_AUTH_MODE",
        "RAY_AUTH_TOKEN",
    }
    assert required <= names, required - names
    assert set(CONFIG_MAP["data"]) <= settings_env_names()
    for name, env in all_env_lists():
        assert {e["name"] for e in env} <= known, name
    # prefect.yaml's pull step starts runs in $MLOPS_PROJECT_DIR: the image's project directory.
    workdir = re.search(r"^WORKDIR (\S+)$", DOCKERFILE, re.M).group(1)
    assert re.search(rf"^ENV {PROJECT_DIR_VAR}={re.escape(workdir)}$", DOCKERFILE, re.M)


def test_the_flow_run_reaches_the_ray_head_service_client_port(
    cluster_settings: Settings,
) -> None:
    name, namespace = RAYCLUSTER["metadata"]["name"], RAYCLUSTER["metadata"]["namespace"]
    client_port = next(
        p["containerPort"] for p in container(groups()["head"])["ports"] if p["name"] == "client"
    )
    address = urlsplit(cluster_settings.ray_address)
    assert address.scheme == "ray"
    host = address.hostname.split(".")
    assert host[0] == f"{name}-head-svc"  # the Service KubeRay creates for the head
    assert host[1:] in ([], [namespace, "svc", "cluster", "local"])
    assert address.port == client_port
    assert variable_default("namespace") == namespace == CONFIG_MAP["metadata"]["namespace"]
    assert cluster_settings.storage_root == CONFIG_MAP["data"]["MLOPS_STORAGE_ROOT"]
    assert cluster_settings.prefect_api_url.startswith("http")


def test_ray_token_auth_everywhere_with_the_token_from_a_secret() -> None:
    for name, env in all_env_lists():
        by_name = {e["name"]: e for e in env}
        assert by_name["RAY_AUTH_MODE"].get("value") == "token", name
        ref = by_name["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in SECRETS[ref["name"]], name


def test_references_name_the_config_map_and_secrets_that_exist() -> None:
    config_name = CONFIG_MAP["metadata"]["name"]
    for name, env in all_env_lists():
        for entry in env:
            source = entry.get("valueFrom", {})
            if "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                assert ref["name"] == config_name and ref["key"] in CONFIG_MAP["data"], name
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                assert ref["key"] in SECRETS.get(ref["name"], ()), (name, ref)
    for group in groups().values():
        refs = container(group).get("envFrom", [])
        assert {r["configMapRef"]["name"] for r in refs if "configMapRef" in r} == {config_name}


SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|PRIVATE", re.I)
SECRET_TEXT = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # an AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b[0-9a-f]{32,}\b"),  # a hex token such as `openssl rand -hex 16`
    re.compile(r"(?i)(token|secret|password)\s*[:=]\s*[\"']?[A-Za-z0-9+/_-]{12,}"),
]


def test_no_secret_values_in_any_manifest() -> None:
    for name, env in all_env_lists():
        for entry in env:
            if SECRET_NAME.search(entry["name"]):
                assert "value" not in entry and "valueFrom" in entry, (name, entry["name"])
    for path in MANIFEST_FILES:
        text = path.read_text()
        for pattern in SECRET_TEXT:
            assert not pattern.search(text), (path.name, pattern.pattern)
        docs = [json.loads(text)] if path.suffix == ".json" else yaml.safe_load_all(text)
        assert all(d.get("kind") != "Secret" for d in docs if d), path.name


def test_the_flow_run_pod_is_small_next_to_a_ray_worker() -> None:
    cpu_worker = container(groups()["cpu-workers"])["resources"]["limits"]
    cpu_request, cpu_limit = (quantity(variable_default(k)) for k in ("cpu_request", "cpu_limit"))
    mem_request, mem_limit = (
        quantity(variable_default(k)) for k in ("memory_request", "memory_limit")
    )
    assert 0 < cpu_request <= cpu_limit <= quantity(cpu_worker["cpu"]) / 2
    assert 0 < mem_request <= mem_limit <= quantity(cpu_worker["memory"]) / 4


def test_reading_the_asks_starts_no_ray() -> None:
    """In a fresh interpreter: the test session itself may already run Ray."""
    import subprocess
    import sys

    code = (
        "import ray\n"
        "from cli import sizing\n"
        "from mlops.settings import load_settings\n"
        "s = load_settings()\n"
        "sizing.gpu_node_needs(s); sizing.cpu_node_needs(s)\n"
        "print(ray.is_initialized())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
