"""Feature building shared by the Ray Data transform and the serving application.

Only facts known when a flight is scheduled are used, so a model trained here can answer before
departure. One function builds features for both paths, so training and serving cannot skew.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from functools import lru_cache

import numpy as np
import pandas as pd

from mlops.schema import LEAKY_COLUMNS, WEATHER_COLUMNS, WEATHER_KEY

LABEL = "label"
LABEL_THRESHOLD_MINUTES = 15.0  # US DOT on-time definition: arriving 15+ minutes late is "late"

PLANE_COLUMNS = ("plane_year", "seats", "engines", "plane_type", "manufacturer")

FEATURE_COLUMNS: tuple[str, ...] = (
    "month",
    "day",
    "day_of_week",
    "day_of_year",
    "sched_dep_hour",
    "sched_dep_minute_of_day",
    "sched_arr_minute_of_day",
    "sched_block_minutes",
    "distance",
    "flight",
    "carrier_code",
    "origin_code",
    "dest_code",
    *WEATHER_COLUMNS,
    "plane_age",
    "seats",
    "engines",
    "plane_type_code",
    "manufacturer_code",
    "weather_known",
    "plane_known",
)

SPLITS = ("train", "valid", "test")


class LeakageError(ValueError):
    """A post-departure column reached the feature set."""


def assert_no_leakage(columns: Sequence[str]) -> None:
    leaked = sorted(set(columns) & LEAKY_COLUMNS)
    if leaked:
        raise LeakageError(f"post-departure columns in features: {', '.join(leaked)}")


assert_no_leakage(FEATURE_COLUMNS)


def stable_code(values: pd.Series) -> pd.Series:
    """A deterministic numeric code per category (CRC32), NaN for missing.

    It needs no fitted vocabulary, so a category first seen at serving time still gets a code.
    """
    return pd.Series(_codes(_str(values).to_numpy()), index=values.index)


def _num(values: pd.Series) -> pd.Series:
    """Plain float64 (Ray Data hands over Arrow-backed columns; unparseable values become NaN)."""
    return pd.to_numeric(values, errors="coerce").astype("float64")


def _str(values: pd.Series) -> pd.Series:
    """Plain object strings with None for missing, whatever the input dtype."""
    out = values.astype("object")
    return out.where(out.notna(), None)


@lru_cache(maxsize=65_536)
def _code(value: str) -> float:
    return float(zlib.crc32(value.encode()) % 100_003)


def _codes(values: np.ndarray) -> np.ndarray:
    return np.fromiter(
        (np.nan if v is None else _code(str(v)) for v in values), dtype="float64", count=len(values)
    )


def prepare_weather(weather: pd.DataFrame) -> pd.DataFrame:
    """One weather row per (origin, local date, hour); the source repeats a few DST hours."""
    cols = [*WEATHER_KEY, *WEATHER_COLUMNS]
    out = weather.loc[:, cols].drop_duplicates(subset=list(WEATHER_KEY), keep="first")
    out = out.astype({c: "float64" for c in WEATHER_COLUMNS})
    return out.astype(
        {"origin": "object", "year": "int64", "month": "int64", "day": "int64", "hour": "int64"}
    )


def prepare_planes(planes: pd.DataFrame) -> pd.DataFrame:
    """One row per tailnum with the plane columns features use (idempotent on its own output)."""
    out = planes.rename(columns={"year": "plane_year", "type": "plane_type"})
    out = out.loc[:, ["tailnum", *PLANE_COLUMNS]]
    out = out.drop_duplicates(subset=["tailnum"], keep="first")
    return out.astype(
        {
            "tailnum": "object",
            "plane_year": "float64",
            "seats": "float64",
            "engines": "float64",
            "plane_type": "object",
            "manufacturer": "object",
        }
    )


@dataclass(frozen=True)
class Lookups:
    """Weather and plane attributes keyed for O(1) lookups, built once per process.

    Built from :func:`prepare_weather` / :func:`prepare_planes` outputs. A dictionary lookup per
    row is what lets one feature function serve both a 40,000-row Ray Data batch and a
    single-flight request in well under a millisecond of join work.
    """

    weather_index: dict[tuple[str, int, int, int, int], int]
    weather_values: np.ndarray
    plane_index: dict[str, int]
    plane_values: np.ndarray  # plane_year, seats, engines, plane_type_code, manufacturer_code

    @classmethod
    def from_frames(cls, weather: pd.DataFrame, planes: pd.DataFrame) -> Lookups:
        w = prepare_weather(weather)
        p = prepare_planes(planes)
        keys = zip(w["origin"], w["year"], w["month"], w["day"], w["hour"], strict=True)
        weather_index = {
            (str(o), int(y), int(m), int(d), int(h)): i for i, (o, y, m, d, h) in enumerate(keys)
        }
        plane_values = (
            np.column_stack(
                [
                    p["plane_year"].to_numpy(dtype="float64"),
                    p["seats"].to_numpy(dtype="float64"),
                    p["engines"].to_numpy(dtype="float64"),
                    stable_code(p["plane_type"]).to_numpy(),
                    stable_code(p["manufacturer"]).to_numpy(),
                ]
            )
            if len(p)
            else np.empty((0, 5))
        )
        return cls(
            weather_index=weather_index,
            weather_values=w.loc[:, list(WEATHER_COLUMNS)].to_numpy(dtype="float64"),
            plane_index={str(t): i for i, t in enumerate(p["tailnum"])},
            plane_values=plane_values,
        )


def _take(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    out = np.full((len(idx), values.shape[1]), np.nan)
    hit = idx >= 0
    out[hit] = values[idx[hit]]
    return out


def build_features(flights: pd.DataFrame, lookups: Lookups) -> pd.DataFrame:
    """Join flights with weather (origin, scheduled hour) and planes (tailnum); derive features.

    Returns the feature columns in ``FEATURE_COLUMNS`` order plus ``date`` and, when the input
    has ``arr_delay``, ``label`` (NaN for cancelled or diverted flights).
    """
    n = len(flights)
    year, month, day = (
        _num(flights[c]).fillna(-1).astype("int64").to_numpy() for c in ("year", "month", "day")
    )
    dep = _num(flights["sched_dep_time"]).to_numpy()
    arr = _num(flights["sched_arr_time"]).to_numpy()
    carrier, tailnum, origin, dest = (
        _str(flights[c]).to_numpy() for c in ("carrier", "tailnum", "origin", "dest")
    )
    hour = np.where(np.isnan(dep), -1, dep // 100).astype("int64")
    w_get, p_get = lookups.weather_index.get, lookups.plane_index.get
    w_idx = np.fromiter(
        (
            w_get((o, y, m, d, h), -1)
            for o, y, m, d, h in zip(
                origin, year.tolist(), month.tolist(), day.tolist(), hour.tolist(), strict=True
            )
        ),
        dtype="int64",
        count=n,
    )
    p_idx = np.fromiter((p_get(t, -1) for t in tailnum), dtype="int64", count=n)
    weather = _take(lookups.weather_values, w_idx)
    plane = _take(lookups.plane_values, p_idx)

    dates = pd.to_datetime(dict(year=year, month=month, day=day), errors="coerce")
    dep_min = (dep // 100) * 60 + dep % 100
    arr_min = (arr // 100) * 60 + arr % 100
    columns = {
        "month": month.astype("float64"),
        "day": day.astype("float64"),
        "day_of_week": dates.dt.dayofweek.to_numpy(dtype="float64"),
        "day_of_year": dates.dt.dayofyear.to_numpy(dtype="float64"),
        "sched_dep_hour": dep // 100,
        "sched_dep_minute_of_day": dep_min,
        "sched_arr_minute_of_day": arr_min,
        "sched_block_minutes": (arr_min - dep_min) % 1440,
        "distance": _num(flights["distance"]).to_numpy(),
        "flight": _num(flights["flight"]).to_numpy(),
        "carrier_code": _codes(carrier),
        "origin_code": _codes(origin),
        "dest_code": _codes(dest),
        **{c: weather[:, i] for i, c in enumerate(WEATHER_COLUMNS)},
        "plane_age": year - plane[:, 0],
        "seats": plane[:, 1],
        "engines": plane[:, 2],
        "plane_type_code": plane[:, 3],
        "manufacturer_code": plane[:, 4],
        "weather_known": (w_idx >= 0).astype("float64"),
        "plane_known": (p_idx >= 0).astype("float64"),
    }
    out = pd.DataFrame(columns, index=flights.index).loc[:, list(FEATURE_COLUMNS)]
    assert_no_leakage(out.columns)
    out["date"] = dates.dt.strftime("%Y-%m-%d").to_numpy(dtype=object)
    if "arr_delay" in flights.columns:
        out[LABEL] = make_label(flights["arr_delay"]).to_numpy()
    return out


@dataclass(frozen=True)
class RequestFeatures:
    """Features of validated serving requests as one float64 matrix in ``FEATURE_COLUMNS`` order."""

    matrix: np.ndarray
    dates: list[str | None]  # ISO date, None for an impossible one (e.g. February 30)

    @property
    def weather_known(self) -> np.ndarray:
        return self.matrix[:, _WEATHER_KNOWN] == 1.0

    @property
    def plane_known(self) -> np.ndarray:
        return self.matrix[:, _PLANE_KNOWN] == 1.0


_WEATHER_KNOWN = FEATURE_COLUMNS.index("weather_known")
_PLANE_KNOWN = FEATURE_COLUMNS.index("plane_known")
_NO_DAY = (np.nan, np.nan, None)


@lru_cache(maxsize=4096)
def _calendar(year: int, month: int, day: int) -> tuple[float, float, str | None]:
    """(day of week, day of year, ISO date) as ``pd.to_datetime(..., errors="coerce")`` gives."""
    try:
        d = date(year, month, day)
    except ValueError:
        return _NO_DAY
    return float(d.weekday()), float(d.timetuple().tm_yday), d.isoformat()


def request_features(rows: Sequence[Mapping], lookups: Lookups) -> RequestFeatures:
    """The serving fast path: exactly :func:`build_features`' features, without pandas.

    ``rows`` are validated requests (``REQUEST_COLUMNS``; ``tailnum`` may be missing or None).
    Building a DataFrame costs milliseconds whatever its size, which a one-flight request cannot
    afford; column lists, dictionary lookups and numpy arithmetic cost microseconds. The same
    arithmetic on the same float64 values as :func:`build_features` keeps the two equal, and
    tests check that on real flights.
    """
    n = len(rows)
    year = [int(r["year"]) for r in rows]
    month = [int(r["month"]) for r in rows]
    day = [int(r["day"]) for r in rows]
    origin = [r["origin"] for r in rows]
    dep = np.array([r["sched_dep_time"] for r in rows], dtype="float64").reshape(n)
    arr = np.array([r["sched_arr_time"] for r in rows], dtype="float64").reshape(n)
    hour = (dep // 100).astype("int64").tolist()
    w_get, p_get = lookups.weather_index.get, lookups.plane_index.get
    w_idx = np.fromiter(
        (w_get(k, -1) for k in zip(origin, year, month, day, hour, strict=True)),
        dtype="int64",
        count=n,
    )
    p_idx = np.fromiter((p_get(r.get("tailnum"), -1) for r in rows), dtype="int64", count=n)
    cal = [_calendar(y, m, d) for y, m, d in zip(year, month, day, strict=True)]

    weather = _take(lookups.weather_values, w_idx)
    plane = _take(lookups.plane_values, p_idx)
    dep_min = (dep // 100) * 60 + dep % 100
    arr_min = (arr // 100) * 60 + arr % 100
    columns = {
        "month": month,
        "day": day,
        "day_of_week": [c[0] for c in cal],
        "day_of_year": [c[1] for c in cal],
        "sched_dep_hour": dep // 100,
        "sched_dep_minute_of_day": dep_min,
        "sched_arr_minute_of_day": arr_min,
        "sched_block_minutes": (arr_min - dep_min) % 1440,
        "distance": [r["distance"] for r in rows],
        "flight": [r["flight"] for r in rows],
        "carrier_code": [_code(str(r["carrier"])) for r in rows],
        "origin_code": [_code(str(o)) for o in origin],
        "dest_code": [_code(str(r["dest"])) for r in rows],
        **{c: weather[:, i] for i, c in enumerate(WEATHER_COLUMNS)},
        "plane_age": np.array(year, dtype="int64") - plane[:, 0],
        "seats": plane[:, 1],
        "engines": plane[:, 2],
        "plane_type_code": plane[:, 3],
        "manufacturer_code": plane[:, 4],
        "weather_known": w_idx >= 0,
        "plane_known": p_idx >= 0,
    }
    x = np.empty((n, len(FEATURE_COLUMNS)), dtype="float64")
    for i, name in enumerate(FEATURE_COLUMNS):
        x[:, i] = columns[name]
    return RequestFeatures(matrix=x, dates=[c[2] for c in cal])


def make_label(arr_delay: pd.Series) -> pd.Series:
    """1.0 when the flight arrived 15+ minutes late, 0.0 otherwise, NaN when it never arrived."""
    delay = pd.to_numeric(arr_delay, errors="coerce")
    return pd.Series(
        np.where(delay.isna(), np.nan, (delay >= LABEL_THRESHOLD_MINUTES).astype("float64")),
        index=arr_delay.index,
    )


def split_bounds(
    dates: Sequence[str], fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
) -> dict[str, tuple[str, str]]:
    """Cut the sorted distinct dates into consecutive train / valid / test windows.

    Splitting by time (not at random) means the model is judged on days after those it learnt
    from, as it will be in production.
    """
    days = sorted(set(dates))
    if len(days) < 3:
        raise ValueError(f"need at least 3 distinct dates to split by time, got {len(days)}")
    if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"split fractions must be positive and sum to 1, got {fractions}")
    n = len(days)
    n_train = max(1, round(n * fractions[0]))
    n_valid = max(1, round(n * fractions[1]))
    n_train = min(n_train, n - 2)
    n_valid = min(n_valid, n - n_train - 1)
    cuts = {
        "train": (days[0], days[n_train - 1]),
        "valid": (days[n_train], days[n_train + n_valid - 1]),
        "test": (days[n_train + n_valid], days[-1]),
    }
    return cuts


def assign_split(dates: pd.Series, bounds: dict[str, tuple[str, str]]) -> pd.Series:
    """Name the split of each date; dates outside every window get ``None``."""
    out = pd.Series(None, index=dates.index, dtype="object")
    for name, (lo, hi) in bounds.items():
        out[(dates >= lo) & (dates <= hi)] = name
    return out
