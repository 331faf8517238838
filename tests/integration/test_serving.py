"""The Ray Serve application over real HTTP: schema, parity, logs, metrics, promotion under load.

Runs after the training module on the same session Ray, Prefect API, registry and application.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from mlops.features import FEATURE_COLUMNS, LABEL, build_features
from mlops.lake import load_lookups
from mlops.registry import CHAMPION, PREVIOUS_CHAMPION
from mlops.results import PipelineSummary, PromotionDecision, RegisteredModel
from mlops.runtime import Runtime
from mlops.settings import load_settings
from mlops.storage import Storage
from tests.integration.conftest import serve_as_champion

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(first_run: PipelineSummary, platform: Runtime) -> Iterator[PipelineSummary]:
    """A known starting point: the first run's model as champion, served by two routers.

    The rest of the suite runs one router replica (tests/conftest.py); here two, so that the
    switches are checked on every replica, as production runs them.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLOPS_SERVE_ROUTER_REPLICAS", "2")
        serve_as_champion(first_run)
        yield first_run


def requests_for(summary: PipelineSummary, n: int = 5) -> list[dict[str, Any]]:
    from tasks.promote import smoke_flights

    settings = load_settings()
    return smoke_flights(settings.storage_root, settings.storage_options, summary.features, n)


def post(body: Any, path: str = "/predict") -> httpx.Response:
    return httpx.post(f"{load_settings().serve_url}{path}", json=body, timeout=30)


def test_training_and_serving_build_identical_features(served: PipelineSummary) -> None:
    """The same flights through the Ray Data transform and through the serving path."""
    from mlops.lake import partition_path, read_split
    from mlops.schema import to_requests

    settings = load_settings()
    storage = Storage(settings.storage_root, settings.storage_options)
    day = served.features.split_bounds["test"][1]
    raw = storage.read_parquet(partition_path("flights", day)).to_pandas()
    raw = raw[raw["arr_delay"].notna()]  # the transform keeps labelled flights only
    lookups = load_lookups(served.features.dims_uri, settings.storage_options)
    serving = build_features(pd.DataFrame(to_requests(raw)), lookups)

    trained = read_split(storage, served.features, "test")
    month, dom = int(day[5:7]), int(day[8:10])
    trained = trained[(trained["month"] == month) & (trained["day"] == dom)]
    key = ["flight", "sched_dep_minute_of_day", "carrier_code", "dest_code", "origin_code"]
    cols = list(FEATURE_COLUMNS)
    a = serving[cols].sort_values(key).reset_index(drop=True)
    b = trained[cols].sort_values(key).reset_index(drop=True)
    assert len(a) == len(b) > 100
    pd.testing.assert_frame_equal(a, b, check_exact=True, check_dtype=False)
    assert LABEL not in serving


@pytest.mark.parametrize(
    ("mutate", "status", "field"),
    [
        (lambda r: r.pop("carrier"), 422, "carrier"),
        (lambda r: r.update(distance="far"), 422, "distance"),
        (lambda r: r.update(month=13), 422, "month"),
        (lambda r: r.update(carrier="ZZ"), 422, "carrier"),
        (lambda r: r.update(surprise=1), 422, "surprise"),
    ],
)
def test_bad_requests_get_422_naming_the_field(
    served: PipelineSummary, mutate: Any, status: int, field: str
) -> None:
    good = requests_for(served, 2)
    bad = dict(good[1])
    mutate(bad)
    resp = post([good[0], bad])
    assert resp.status_code == status, resp.text
    locs = [d["loc"] for d in resp.json()["detail"]]
    assert any(field in [str(x) for x in loc] for loc in locs), locs
    assert any(1 in loc for loc in locs)  # the failing row's index is named too


def test_empty_oversized_and_malformed_bodies(served: PipelineSummary) -> None:
    empty = post([])
    assert empty.status_code == 200 and empty.json()["predictions"] == []
    one = requests_for(served, 1)[0]
    too_many = post([one] * 10_001)
    assert too_many.status_code == 413
    broken = httpx.post(
        f"{load_settings().serve_url}/predict",
        content=b"{not json",
        timeout=30,
        headers={"content-type": "application/json"},
    )
    assert broken.status_code == 400


def test_unknown_paths_methods_and_slots(served: PipelineSummary) -> None:
    url, one = load_settings().serve_url, requests_for(served, 1)
    assert httpx.get(f"{url}/nowhere", timeout=30).status_code == 404
    assert httpx.get(f"{url}/predict", timeout=30).status_code == 405
    assert httpx.post(f"{url}/version", timeout=30).status_code == 405
    unknown = post(one, "/slots/purple/predict")
    assert unknown.status_code == 404 and "purple" in unknown.json()["detail"]
    assert post(one, "/slots/blue/elsewhere").status_code == 404
    slot = httpx.get(f"{url}/slots/blue/healthz", timeout=30)
    assert slot.status_code == 200 and slot.json()["slot"] == "blue"


def test_single_flight_and_unknown_lookups_still_predict(served: PipelineSummary) -> None:
    flight = dict(
        requests_for(served, 1)[0],
        tailnum="N0TREAL",
        day=served.features.split_bounds["test"][1][8:10],
    )
    flight["day"] = int(flight["day"])
    flight["sched_dep_time"] = 2359  # an hour with no weather observation in the lookups
    resp = post(flight)
    assert resp.status_code == 200, resp.text
    pred = resp.json()["predictions"]
    assert len(pred) == 1 and "plane" in pred[0]["missing"]


def test_router_scores_the_primary_in_process_like_the_slot(served: PipelineSummary) -> None:
    """Once every router has loaded the primary's model, its answers equal the slot replica's."""
    url = load_settings().serve_url
    deadline = time.monotonic() + 120
    while True:
        health = healthz_answers(url)
        if {h["scored_by"] for h in health} == {"router"} and len(replicas_of(health)) == 2:
            break
        assert time.monotonic() < deadline, f"the routers never loaded the primary: {health}"
        time.sleep(0.5)
    primary = health[0]["slot"]
    body = requests_for(served, 8)
    direct, forwarded = post(body).json(), post(body, f"/slots/{primary}/predict").json()
    assert direct["version"] == forwarded["version"] == served.model.version
    assert direct["predictions"] == forwarded["predictions"]
    assert direct["slot"] == forwarded["slot"] == primary


def test_version_endpoint_describes_the_champion(served: PipelineSummary) -> None:
    info = httpx.get(f"{load_settings().serve_url}/version", timeout=30).json()
    assert info["version"] == served.model.version
    assert info["alias"] == "champion" and info["run_id"] == served.model.run_id
    assert info["promoted_at"] and info["model"] == served.model.name


def test_answered_rows_reach_the_inference_log(served: PipelineSummary) -> None:
    """Exactly the rows this test had answered are logged, with what they were answered."""
    settings = load_settings()
    body = requests_for(served, 7)
    since = time.time()  # rows scored from now on are this test's: tests run one at a time
    resp = post(body)
    assert resp.status_code == 200
    answered = sorted(p["probability_late"] for p in resp.json()["predictions"])

    def logged_now() -> pd.DataFrame:
        files = list(Path(settings.storage_root, "inference_log").rglob("*.parquet"))
        frame = pd.concat([pd.read_parquet(f) for f in files]) if files else pd.DataFrame()
        return frame[frame["ts"] >= since] if len(frame) else frame

    assert post({}, "/admin/flush-log").status_code == 200
    deadline = time.monotonic() + 30  # another router replica flushes on its own 2 s timer
    while len(logged := logged_now()) < len(body) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # and nothing more arrives
    logged = logged_now()
    assert len(logged) == len(body), len(logged)
    assert {"probability_late", "model_version", "ts", "date", *FEATURE_COLUMNS} <= set(logged)
    assert set(logged["model_version"]) == {served.model.version}
    assert sorted(logged["probability_late"]) == pytest.approx(answered, abs=1e-6)
    sent = sorted((r["carrier"], r["origin"], r["dest"]) for r in body)
    assert sorted(zip(logged["carrier"], logged["origin"], logged["dest"], strict=True)) == sent


def scrape_flights_metrics(port: int) -> list[Any]:
    """Every ``ray_flights_*`` sample on the node's metrics endpoint, parsed as Prometheus does."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("ray_flights_")
    ]


def metric_sum(samples: list[Any], name: str, **labels: str) -> float:
    """The sum over every series (each router and model replica exports its own) of ``name``."""
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_metrics_are_exported_in_prometheus_format(served: PipelineSummary) -> None:
    """The README's metric names, scraped: each counter moves by exactly what was sent.

    Ray exports custom metrics with a ``ray_`` prefix; the router hands its counts to Ray once
    a second and Ray's agent exports them a few seconds later, so the figures are read once
    they have settled, before and after.
    """
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    version = served.model.version
    primary = httpx.get(f"{load_settings().serve_url}/healthz", timeout=30).json()["slot"]

    def figures() -> dict[str, float]:
        samples = scrape_flights_metrics(port)
        return {
            "ok": metric_sum(samples, "ray_flights_requests_total", status="200", slot=primary),
            "rejected": metric_sum(samples, "ray_flights_requests_total", status="422"),
            "errors": metric_sum(samples, "ray_flights_request_errors_total"),
            "latency_count": metric_sum(samples, "ray_flights_request_latency_ms_count"),
            "predictions": metric_sum(
                samples, "ray_flights_predictions_total", model_version=version
            ),
        }

    def settled(deadline_s: float = 90) -> dict[str, float]:
        deadline, last = time.monotonic() + deadline_s, figures()
        while time.monotonic() < deadline:
            time.sleep(2)  # twice Ray's export interval in tests (tests/conftest.py)
            now = figures()
            if now == last:
                return now
            last = now
        raise AssertionError(f"the exported metrics kept moving for {deadline_s:.0f}s: {last}")

    before = settled()
    good = requests_for(served, 2)
    for _ in range(3):
        assert post(good).status_code == 200
    for _ in range(2):
        assert post([dict(good[0], month=13)]).status_code == 422
    sent = {"ok": 3, "rejected": 2, "errors": 2, "latency_count": 5, "predictions": 6}

    deadline = time.monotonic() + 90
    while True:
        now = figures()
        delta = {k: now[k] - before[k] for k in sent}
        if all(delta[k] >= sent[k] for k in sent) or time.monotonic() > deadline:
            break
        time.sleep(2)
    after = settled()
    assert {k: after[k] - before[k] for k in sent} == sent
    assert any(
        s.name == "ray_flights_request_latency_ms_bucket" for s in scrape_flights_metrics(port)
    )


class Load:
    """A bounded loopback load generator: a few threads posting one flight each, continuously.

    Each thread sends at most ``rate_per_thread`` requests a second, so that the request bound
    outlasts a promotion and a rollback however fast the server answers; ``capped`` tells when
    it did not. Anything but a 2xx answer with a well-formed body for every flight sent is a
    failure, and so is a generator thread that dies or does not stop. Every answer is kept as
    (sent, received, version), monotonic seconds, to check what was served when.
    """

    def __init__(
        self,
        body: list[dict[str, Any]],
        threads: int = 3,
        max_requests: int = 20_000,
        rate_per_thread: float = 100.0,
    ):
        self.url = f"{load_settings().serve_url}/predict"
        self.body, self.max_requests = body, max_requests
        self.pause_s = 1.0 / rate_per_thread
        self.statuses: Counter[int] = Counter()
        self.versions: Counter[str] = Counter()
        self.answers: list[tuple[float, float, str]] = []
        self.failures: list[str] = []
        self.sent = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _check(self, resp: httpx.Response) -> str:
        """The answering version of a well-formed answer; raises ValueError for anything else."""
        if not 200 <= resp.status_code < 300:
            raise ValueError(f"HTTP {resp.status_code}: {resp.text[:200]}")
        out = resp.json()
        preds = out["predictions"]
        if not isinstance(out["version"], str) or len(preds) != len(self.body):
            raise ValueError(f"malformed answer: {resp.text[:200]}")
        if not all(0.0 <= p["probability_late"] <= 1.0 and "late" in p for p in preds):
            raise ValueError(f"malformed prediction: {resp.text[:200]}")
        return out["version"]

    def _run(self) -> None:
        try:
            with httpx.Client(timeout=30) as client:
                while not self._stop.is_set() and self.sent < self.max_requests:
                    sent = time.monotonic()
                    with self._lock:
                        self.sent += 1
                    try:
                        resp = client.post(self.url, json=self.body)
                        with self._lock:
                            self.statuses[resp.status_code] += 1
                        version = self._check(resp)
                        with self._lock:
                            self.versions[version] += 1
                            self.answers.append((sent, time.monotonic(), version))
                    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                        with self._lock:
                            self.failures.append(repr(exc))
                    time.sleep(self.pause_s)
        except BaseException as exc:  # the thread itself died: the test must see it
            with self._lock:
                self.failures.append(f"generator thread died: {exc!r}")
            raise

    @property
    def capped(self) -> bool:
        return self.sent >= self.max_requests

    def versions_between(self, after: float, before: float) -> Counter[str]:
        """Versions of the requests sent after ``after`` and answered before ``before``."""
        with self._lock:
            return Counter(v for s, r, v in self.answers if s >= after and r <= before)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        time.sleep(1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(1.0)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            self.failures.append(f"generator threads did not stop: {stuck}")


def healthz_answers(url: str, calls: int = 32) -> list[dict[str, Any]]:
    """/healthz asked 8 at a time: HAProxy balances by least connections, so concurrent
    requests reach every router replica."""
    from concurrent.futures import ThreadPoolExecutor

    def one(_: int) -> dict[str, Any]:
        return httpx.get(f"{url}/healthz", timeout=30).json()

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(calls)))


def replicas_of(answers: list[dict[str, Any]]) -> set[str]:
    return {str(a["replica"]) for a in answers}


def router_replicas(url: str) -> set[str]:
    """The router replicas that answer /healthz."""
    return replicas_of(healthz_answers(url))


def second_version(served: PipelineSummary) -> RegisteredModel:
    """A new registry version of the same booster: a challenger that loads and passes smoke."""
    from mlflow.tracking import MlflowClient

    settings = load_settings()
    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    base = client.get_model_version(settings.model_name, served.model.version)
    artifacts = client.get_model_version_download_uri(settings.model_name, served.model.version)
    mv = client.create_model_version(settings.model_name, source=artifacts, run_id=base.run_id)
    return RegisteredModel(settings.model_name, str(mv.version), base.run_id, "")


def promote_decision(model: RegisteredModel, champion: str) -> PromotionDecision:
    return PromotionDecision(
        True, "test", "roc_auc", model.version, champion, 0.7, 0.6, 0.1, (0.05, 0.15), 0.0
    )


def test_blue_green_promotion_and_rollback_drop_no_request(served: PipelineSummary) -> None:
    from mlflow.tracking import MlflowClient

    from serving.control import rollback_serving
    from tasks.promote import promote

    settings = load_settings()
    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    new = second_version(served)
    routers = router_replicas(settings.serve_url)
    assert len(routers) == settings.serve_router_replicas == 2  # every replica must switch
    with Load(requests_for(served, 1)) as load:
        result = promote(
            settings, promote_decision(new, served.model.version), new, served.features
        )
        promoted = time.monotonic()
        assert result.model_version == new.version and result.alias_moved
        time.sleep(2)
        assert str(client.get_model_version_by_alias(settings.model_name, CHAMPION).version) == (
            new.version
        )
        rolling_back = time.monotonic()
        back = rollback_serving(settings)
        rolled_back = time.monotonic()
        time.sleep(2)
    assert load.failures == [] and set(load.statuses) == {200}, (load.statuses, load.failures[:3])
    assert load.sent > 50 and not load.capped  # it ran through the switches
    # Once promote returned, every router replica answers with the new version, and once
    # the rollback returned, with the old one again: nothing in between is left behind.
    after_promotion = load.versions_between(promoted, rolling_back)
    assert set(after_promotion) == {new.version} and after_promotion.total() > 20, after_promotion
    after_rollback = load.versions_between(rolled_back, time.monotonic())
    assert set(after_rollback) == {served.model.version}, after_rollback
    assert after_rollback.total() > 20
    assert back.primary_model.version == served.model.version
    assert str(client.get_model_version_by_alias(settings.model_name, CHAMPION).version) == (
        served.model.version
    )
    assert str(
        client.get_model_version_by_alias(settings.model_name, PREVIOUS_CHAMPION).version
    ) == (new.version)
    live = httpx.get(f"{settings.serve_url}/version", timeout=30).json()
    assert live["version"] == served.model.version
    # the traffic switches were applied in place: the same router replicas answer
    assert router_replicas(settings.serve_url) == routers


def test_a_state_is_applied_once_every_router_replica_routes_by_it(
    served: PipelineSummary,
) -> None:
    """`deploy_state` returns only when both router replicas route by the new state.

    A traffic switch reaches the running routers a moment after Serve takes it; the very first
    requests after `deploy_state` returns, spread over both replicas, must see it already.
    """
    from concurrent.futures import ThreadPoolExecutor

    from serving.control import deploy_state, routed_as
    from serving.state import load_state, save_state, switch

    settings = load_settings()
    state = load_state(settings)
    assert state is not None and settings.serve_router_replicas == 2

    def answers(calls: int = 32) -> list[dict[str, Any]]:
        def one(_: int) -> dict[str, Any]:
            return httpx.get(f"{settings.serve_url}/version", timeout=30).json()

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, range(calls)))

    flipped = switch(state)  # both slots stay loaded: a pure routing change
    try:
        for target in (flipped, state):
            deploy_state(settings, target)
            seen = answers()
            assert all(routed_as(a, target) for a in seen), [
                (a.get("slot"), a.get("version")) for a in seen
            ]
    finally:
        deploy_state(settings, state)
        save_state(settings, state)


def test_canary_splits_traffic_then_aborts(served: PipelineSummary) -> None:
    from mlflow.tracking import MlflowClient

    from serving.control import finish_canary_serving
    from tasks.promote import promote

    settings = load_settings()
    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    champion = str(client.get_model_version_by_alias(settings.model_name, CHAMPION).version)
    new = second_version(served)
    result = promote(
        settings,
        promote_decision(new, champion),
        new,
        served.features,
        strategy="canary",
        canary_share=0.5,
    )
    assert not result.alias_moved and "canary" in result.detail
    seen = Counter(post(requests_for(served, 1)).json()["version"] for _ in range(60))
    assert seen[new.version] > 5 and seen[champion] > 5, seen
    info = httpx.get(f"{settings.serve_url}/version", timeout=30).json()
    assert info["canary"]["version"] == new.version and info["canary"]["share"] == 0.5
    assert str(client.get_model_version_by_alias(settings.model_name, CHAMPION).version) == champion

    state = finish_canary_serving(settings, promote_it=False)
    assert state.canary is None
    after = Counter(post(requests_for(served, 1)).json()["version"] for _ in range(20))
    assert set(after) == {champion}
    assert np.isclose(sum(after.values()), 20)


def test_serve_config_file_builds_the_application(served: PipelineSummary) -> None:
    """deployments/serve_config.yaml names an import path that builds the saved state's app."""
    import importlib

    import yaml
    from ray.serve.deployment import Application

    cfg = yaml.safe_load(Path("deployments/serve_config.yaml").read_text())
    app_cfg = cfg["applications"][0]
    module, name = app_cfg["import_path"].split(":")
    builder = getattr(importlib.import_module(module), name)
    assert isinstance(builder(app_cfg.get("args") or {}), Application)
    assert cfg["http_options"]["port"] == 8000
    # `serve run`/`serve deploy` start the same HAProxy ingress as `mlops serve`
    from ray.serve.schema import ServeDeploySchema

    from mlops.runtime import SERVE_HAPROXY_ENV

    schema = ServeDeploySchema.model_validate(cfg)
    assert schema.controller_options.runtime_env["env_vars"] == SERVE_HAPROXY_ENV


def test_mlops_serve_and_rollback_commands(served: PipelineSummary) -> None:
    """The CLI against the running cluster: serve prints the URL and version, rollback puts the
    previous champion back, and `canary promote` with no canary is a one-line user error."""
    import os
    import subprocess
    import sys

    import ray
    from mlflow.tracking import MlflowClient

    from serving.state import load_state
    from tasks.promote import promote

    settings = load_settings()
    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    champion = str(client.get_model_version_by_alias(settings.model_name, CHAMPION).version)
    state = load_state(settings)
    if (
        state is None
        or state.primary_model.version != champion
        or state.slots[state.standby].version == champion
    ):  # nothing else warm behind the champion (the test runs alone): promote a new version
        new = second_version(served)
        promote(settings, promote_decision(new, champion), new, served.features)
        state = load_state(settings)
    assert state is not None
    front, behind = state.primary_model.version, state.slots[state.standby].version
    assert front != behind
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    mlops = str(Path(sys.executable).parent / "mlops")
    done = subprocess.run([mlops, "serve"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{settings.serve_url}/predict" in done.stdout
    live = httpx.get(f"{settings.serve_url}/version", timeout=30).json()["version"]
    assert live == front and f"version {live}" in done.stdout
    rolled = subprocess.run(
        [mlops, "rollback"], env=env, capture_output=True, text=True, timeout=300
    )
    assert rolled.returncode == 0, rolled.stderr[-2000:]
    assert httpx.get(f"{settings.serve_url}/version", timeout=30).json()["version"] == behind
    assert str(client.get_model_version_by_alias(settings.model_name, CHAMPION).version) == (behind)
    bad = subprocess.run(
        [mlops, "canary", "promote"], env=env, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "no canary is running" in bad.stderr
