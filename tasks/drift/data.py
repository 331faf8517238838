"""Drift inputs: the champion's training snapshot (through its registry lineage) and the current
window (the inference log, or a flights source built through the same feature code as training),
and one drift check over them."""

from __future__ import annotations

import datetime as dt
import posixpath
from typing import Any

import numpy as np
import pandas as pd

from mlops import lake
from mlops.errors import UserError
from mlops.features import FEATURE_COLUMNS
from mlops.results import (
    ChampionReference,
    DriftCheck,
)
from mlops.settings import Settings
from mlops.storage import Storage
from tasks.drift.stats import PREDICTION, DriftPolicy, assess_drift, resolve_window

INFERENCE_LOG = "inference_log"  # the source name that means "what serving answered"


def champion_reference(settings: Settings) -> ChampionReference:
    """The champion version and its training snapshot, from the lineage register wrote."""
    from mlops.registry import CHAMPION, ModelRegistry

    champion = ModelRegistry(settings).champion()
    if champion is None:
        raise UserError(
            f"no champion: model {settings.model_name!r} has no {CHAMPION!r} alias; train first"
        )
    if not champion.lineage.features_uri:
        raise UserError(
            f"champion version {champion.version} of {settings.model_name!r} has no lineage "
            "(no features_uri tag on the version or its run): cannot find its training data"
        )
    return ChampionReference(
        model_name=settings.model_name,
        version=champion.version,
        run_id=champion.run_id,
        features_uri=champion.lineage.features_uri,
        data_window=champion.lineage.data_window,
    )


def score(booster: Any, frame: pd.DataFrame) -> np.ndarray:
    import xgboost as xgb

    if frame.empty:
        return np.empty(0)
    return booster.predict(xgb.DMatrix(frame.loc[:, list(FEATURE_COLUMNS)]))


def load_reference(settings: Settings, champion: ChampionReference, booster: Any) -> pd.DataFrame:
    """The champion's training snapshot, scored by the champion (for the positive rate)."""
    frame = lake.read_snapshot(champion.features_uri, settings.storage_options)
    frame[PREDICTION] = score(booster, frame)
    return frame


def _in_window(dates: pd.Series, window: tuple[dt.date, dt.date] | None) -> pd.Series:
    if window is None:
        return pd.Series(False, index=dates.index)
    return dates.between(window[0].isoformat(), window[1].isoformat())


def _latest(dates: pd.Series) -> dt.date | None:
    valid = dates.dropna()
    return dt.date.fromisoformat(str(valid.max())) if len(valid) else None


def load_source_window(
    settings: Settings,
    source: str,
    start: str | None,
    end: str | None,
    window_days: int,
    booster: Any,
) -> tuple[pd.DataFrame, tuple[dt.date, dt.date] | None, list[str]]:
    """Flights of the window from a source, featurized as the transform does, scored by the model.

    Cancelled and diverted flights stay in: they were scheduled traffic the model would answer.
    """
    from mlops.features import Lookups, build_features
    from mlops.sources import load_source, partition_dates

    tables = load_source(source, settings.storage_options)
    dates = partition_dates(tables.flights)
    window = resolve_window(start, end, window_days, _latest(dates))
    flights = tables.flights.loc[_in_window(dates, window)]
    frame = build_features(flights, Lookups.from_frames(tables.weather, tables.planes))
    frame[PREDICTION] = score(booster, frame)
    notes = [f"{len(frame)} scheduled flights from {source}, featurized by build_features"]
    return frame.reset_index(drop=True), window, notes


def read_inference_log(
    storage_root: str, storage_options: dict[str, Any]
) -> tuple[pd.DataFrame, list[str]]:
    """Every retained inference log file: features, flight date, prediction and model version.

    Files being written (``.tmp-*``) are skipped; unreadable ones are skipped and noted.
    """
    import pyarrow.parquet as pq

    storage = Storage(storage_root, storage_options)
    columns = [*FEATURE_COLUMNS, "date", PREDICTION, "model_version"]
    frames, skipped = [], []
    for path in storage.find(lake.INFERENCE_LOG, ".parquet"):
        if posixpath.basename(path).startswith("."):
            continue
        try:
            frames.append(
                pq.read_table(path, columns=columns, filesystem=storage.pyarrow_fs()).to_pandas()
            )
        except Exception as exc:  # one bad file must not stop every hourly check
            skipped.append(f"{posixpath.basename(path)} ({type(exc).__name__})")
    notes = [f"skipped {len(skipped)} unreadable log file(s): {', '.join(skipped[:5])}"] * bool(
        skipped
    )
    if not frames:
        return pd.DataFrame(columns=columns), notes
    return pd.concat(frames, ignore_index=True), notes


def load_log_window(
    settings: Settings,
    champion_version: str,
    start: str | None,
    end: str | None,
    window_days: int,
) -> tuple[pd.DataFrame, tuple[dt.date, dt.date] | None, list[str]]:
    """Logged requests whose flights fall in the window (by scheduled flight date).

    Every logged row counts for the features; only rows the champion answered count for the
    predicted-positive rate (another version's predictions say nothing about the champion).
    """
    log, notes = read_inference_log(settings.storage_root, settings.storage_options)
    window = resolve_window(start, end, window_days, _latest(log["date"]))
    frame = log.loc[_in_window(log["date"], window)].reset_index(drop=True)
    mine = frame["model_version"].astype(str) == str(champion_version)
    frame[PREDICTION] = pd.to_numeric(frame[PREDICTION], errors="coerce").where(mine)
    notes.append(
        f"{len(frame)} logged rows in the window; {int(mine.sum())} answered by champion version "
        f"{champion_version} (the predicted-positive rate uses those)"
    )
    return frame, window, notes


def run_check(
    settings: Settings,
    champion: ChampionReference,
    source: str,
    start: str | None,
    end: str | None,
    window_days: int,
    policy: DriftPolicy,
) -> DriftCheck:
    """Load the champion's reference and the current window, and assess the drift."""
    from mlops.registry import ModelRegistry

    resolve_window(start, end, window_days, None)  # bad dates fail before any data is read
    booster = ModelRegistry(settings).load_booster(champion.version)
    reference = load_reference(settings, champion, booster)
    if source == INFERENCE_LOG:
        current, window, notes = load_log_window(
            settings, champion.version, start, end, window_days
        )
    else:
        current, window, notes = load_source_window(
            settings, source, start, end, window_days, booster
        )
    report = assess_drift(reference, current, policy)
    return DriftCheck(
        champion=champion,
        source=source,
        window_start=window[0].isoformat() if window else None,
        window_end=window[1].isoformat() if window else None,
        report=report,
        notes=tuple(notes),
    )
