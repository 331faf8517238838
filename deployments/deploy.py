"""Register the deployments in ``prefect.yaml`` with a Prefect server (``mlops deploy``).

The file stays the one source of truth: this reads it only to find the work pools it names and
to report what was registered; the deployments themselves go through Prefect's own
``prefect deploy --all --no-prompt``, exactly as a user would run it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from mlops.errors import UserError

PROJECT_DIR_VAR = "MLOPS_PROJECT_DIR"  # templated into prefect.yaml's pull step


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment as ``prefect.yaml`` declares it."""

    name: str
    entrypoint: str
    work_pool: str


@dataclass(frozen=True)
class DeployedDeployment:
    """One deployment as the server holds it after ``mlops deploy``."""

    full_name: str  # "<flow name>/<deployment name>", what `prefect deployment run` takes
    work_pool: str
    schedules: tuple[str, ...]
    triggers: int
    concurrency: str


def load_project(prefect_file: Path) -> list[DeploymentSpec]:
    """Parse ``prefect.yaml``; a missing or malformed file is a one-line user error."""
    try:
        doc = yaml.safe_load(prefect_file.read_text())
    except FileNotFoundError:
        raise UserError(f"{prefect_file}: no such file") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{prefect_file}: not valid YAML ({str(exc).splitlines()[0]})") from None
    deployments = doc.get("deployments") if isinstance(doc, dict) else None
    if not deployments:
        raise UserError(f"{prefect_file}: declares no deployments")
    specs = []
    for d in deployments:
        try:
            specs.append(DeploymentSpec(d["name"], d["entrypoint"], d["work_pool"]["name"]))
        except (KeyError, TypeError) as exc:
            name = d.get("name", "?") if isinstance(d, dict) else "?"
            raise UserError(f"{prefect_file}: deployment {name!r} lacks {exc}") from None
    return specs


def check_server(api_url: str | None) -> str:
    """The server's URL, once it answers; otherwise a one-line user error."""
    import httpx

    if not api_url:
        raise UserError(
            "PREFECT_API_URL is not set: point it at a Prefect server "
            "(e.g. `prefect server start`, then PREFECT_API_URL=http://127.0.0.1:4200/api)"
        )
    try:
        httpx.get(f"{api_url.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as exc:
        raise UserError(f"no Prefect server answers at {api_url}: {exc}") from None
    return api_url


def ensure_work_pools(pools: set[str], pool_type: str = "process") -> list[str]:
    """Create the named work pools that do not exist yet; return those created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    created = []
    with get_client(sync_client=True) as client:
        for name in sorted(pools):
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
                created.append(name)
    return created


def run_prefect_deploy(prefect_file: Path, names: list[str] | None = None) -> str:
    """``prefect deploy`` for all (or the named) deployments, non-interactively."""
    project_dir = prefect_file.resolve().parent
    env = {**os.environ}
    env.setdefault(PROJECT_DIR_VAR, str(project_dir))
    selection = [a for n in names for a in ("--name", n)] if names else ["--all"]
    cmd = [
        sys.executable,
        "-m",
        "prefect",
        "deploy",
        *selection,
        "--no-prompt",
        "--prefect-file",
        str(prefect_file.resolve()),
    ]
    done = subprocess.run(cmd, cwd=project_dir, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if not ln.startswith("│")), "no output")
        raise UserError(f"prefect deploy failed: {reason}")
    return done.stdout


def read_deployed(names: list[str]) -> list[DeployedDeployment]:
    """What the server now holds for the named deployments."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        deployments = client.read_deployments(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=names))
        )
        out = []
        for d in sorted(deployments, key=lambda d: d.name):
            flow = client.read_flow(d.flow_id)
            automations = client.read_resource_related_automations(f"prefect.deployment.{d.id}")
            options = d.concurrency_options
            out.append(
                DeployedDeployment(
                    full_name=f"{flow.name}/{d.name}",
                    work_pool=d.work_pool_name or "",
                    schedules=tuple(
                        getattr(s.schedule, "cron", None) or str(s.schedule) for s in d.schedules
                    ),
                    triggers=len(automations),
                    concurrency=(
                        f"{d.global_concurrency_limit.limit}"
                        f" ({options.collision_strategy.value if options else 'ENQUEUE'})"
                        if d.global_concurrency_limit
                        else "none"
                    ),
                )
            )
    return out
