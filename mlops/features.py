"""Feature building shared by the Ray Data transform and the serving application.

Only facts known when a flight is scheduled are used, so a model trained here can answer before
departure. One function builds features for both paths, so training and serving cannot skew.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import pandas as pd

LABEL = "label"
LABEL_THRESHOLD_MINUTES = 15.0  # US DOT on-time definition: arriving 15+ minutes late is "late"

# Columns that are only known after departure (or are the label itself): never features.
LEAKY_COLUMNS = frozenset({"dep_time", "dep_delay", "arr_time", "arr_delay", "air_time"})

FLIGHT_KEY = ("date", "carrier", "flight", "origin", "sched_dep_time")
REQUEST_COLUMNS = (
    "year",
    "month",
    "day",
    "sched_dep_time",
    "sched_arr_time",
    "carrier",
    "flight",
    "tailnum",
    "origin",
    "dest",
    "distance",
)
WEATHER_KEY = ("origin", "year", "month", "day", "hour")
WEATHER_COLUMNS = (
    "temp",
    "dewp",
    "humid",
    "wind_dir",
    "wind_speed",
    "wind_gust",
    "precip",
    "pressure",
    "visib",
)
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
    uniques = values.dropna().unique()
    mapping = {v: float(zlib.crc32(str(v).encode()) % 100_003) for v in uniques}
    return values.map(mapping).astype("float64")


def _num(values: pd.Series) -> pd.Series:
    """Plain float64 (Ray Data hands over Arrow-backed columns; unparseable values become NaN)."""
    return pd.to_numeric(values, errors="coerce").astype("float64")


def _str(values: pd.Series) -> pd.Series:
    """Plain object strings with None for missing, whatever the input dtype."""
    out = values.astype("object")
    return out.where(out.notna(), None)


def _minute_of_day(hhmm: pd.Series) -> pd.Series:
    return (hhmm // 100) * 60 + hhmm % 100


def prepare_weather(weather: pd.DataFrame) -> pd.DataFrame:
    """One weather row per (origin, local date, hour); the source repeats a few DST hours."""
    cols = [*WEATHER_KEY, *WEATHER_COLUMNS]
    out = weather.loc[:, cols].drop_duplicates(subset=list(WEATHER_KEY), keep="first")
    out = out.astype({c: "float64" for c in WEATHER_COLUMNS})
    return out.astype(
        {"origin": "object", "year": "int64", "month": "int64", "day": "int64", "hour": "int64"}
    )


def prepare_planes(planes: pd.DataFrame) -> pd.DataFrame:
    out = planes.loc[:, ["tailnum", "year", "seats", "engines", "type", "manufacturer"]]
    out = out.rename(columns={"year": "plane_year", "type": "plane_type"})
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


def build_features(
    flights: pd.DataFrame, weather: pd.DataFrame, planes: pd.DataFrame
) -> pd.DataFrame:
    """Join flights with weather (origin, scheduled hour) and planes (tailnum); derive features.

    ``weather`` and ``planes`` are the outputs of :func:`prepare_weather` / :func:`prepare_planes`.
    Returns the feature columns in ``FEATURE_COLUMNS`` order plus ``date`` and, when the input
    has ``arr_delay``, ``label`` (NaN for cancelled or diverted flights).
    """
    f = pd.DataFrame(
        {
            **{
                c: _num(flights[c])
                for c in (
                    "year",
                    "month",
                    "day",
                    "sched_dep_time",
                    "sched_arr_time",
                    "flight",
                    "distance",
                )
            },
            **{c: _str(flights[c]) for c in ("carrier", "tailnum", "origin", "dest")},
        }
    )
    for c in ("year", "month", "day"):
        f[c] = f[c].fillna(-1).astype("int64")
    f["hour"] = (f["sched_dep_time"] // 100).fillna(-1).astype("int64")
    f = f.merge(weather, how="left", on=list(WEATHER_KEY), validate="many_to_one")
    f = f.merge(planes, how="left", on="tailnum", validate="many_to_one")

    dates = pd.to_datetime(dict(year=f["year"], month=f["month"], day=f["day"]), errors="coerce")
    dep_min = _minute_of_day(f["sched_dep_time"])
    arr_min = _minute_of_day(f["sched_arr_time"])
    out = pd.DataFrame(
        {
            "month": f["month"].astype("float64"),
            "day": f["day"].astype("float64"),
            "day_of_week": dates.dt.dayofweek.astype("float64"),
            "day_of_year": dates.dt.dayofyear.astype("float64"),
            "sched_dep_hour": (f["sched_dep_time"] // 100).astype("float64"),
            "sched_dep_minute_of_day": dep_min.astype("float64"),
            "sched_arr_minute_of_day": arr_min.astype("float64"),
            "sched_block_minutes": ((arr_min - dep_min) % 1440).astype("float64"),
            "distance": f["distance"],
            "flight": f["flight"],
            "carrier_code": stable_code(f["carrier"]),
            "origin_code": stable_code(f["origin"]),
            "dest_code": stable_code(f["dest"]),
            **{c: f[c].astype("float64") for c in WEATHER_COLUMNS},
            "plane_age": (f["year"] - f["plane_year"]).astype("float64"),
            "seats": f["seats"].astype("float64"),
            "engines": f["engines"].astype("float64"),
            "plane_type_code": stable_code(f["plane_type"]),
            "manufacturer_code": stable_code(f["manufacturer"]),
            "weather_known": f["temp"].notna().astype("float64"),
            "plane_known": f["seats"].notna().astype("float64"),
        }
    )
    out = out.loc[:, list(FEATURE_COLUMNS)]
    assert_no_leakage(out.columns)
    out["date"] = dates.dt.strftime("%Y-%m-%d").astype("object")
    if "arr_delay" in flights.columns:
        out[LABEL] = make_label(flights["arr_delay"]).to_numpy()
    out.index = flights.index
    return out


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
