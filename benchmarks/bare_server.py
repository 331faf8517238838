"""The baseline server: the same MLflow model and feature code behind bare FastAPI + uvicorn.

python benchmarks/bare_server.py --port 8100 --version 3   (MLOPS_* settings from the env)
"""

# No ``from __future__ import annotations``: FastAPI reads the annotations at runtime.

import argparse

import uvicorn
from fastapi import FastAPI


def make_app(version: str) -> FastAPI:
    import mlflow
    import mlflow.xgboost
    import pandas as pd
    import xgboost as xgb

    from deployments.serve_app import FlightRequest
    from mlops.features import FEATURE_COLUMNS, build_features, load_lookups
    from mlops.registry import ModelRegistry
    from mlops.settings import load_settings
    from mlops.storage import Storage

    settings = load_settings()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)  # not the process default
    booster = mlflow.xgboost.load_model(f"models:/{settings.model_name}/{version}")
    booster.set_param({"nthread": 1})
    features_uri = ModelRegistry(settings).version_tags(version)["features_uri"]
    snapshot = features_uri.rstrip("/").rsplit("/", 1)[-1]
    dims_uri = Storage(settings.storage_root, settings.storage_options).uri(
        "curated/dims", snapshot
    )
    lookups = load_lookups(dims_uri, settings.storage_options)
    app = FastAPI()

    @app.post("/predict")
    def predict(body: list[FlightRequest]) -> dict:
        if not body:
            return {"version": version, "predictions": []}
        feats = build_features(pd.DataFrame([f.model_dump() for f in body]), lookups)
        probs = booster.predict(xgb.DMatrix(feats.loc[:, list(FEATURE_COLUMNS)]))
        return {"version": version, "predictions": [{"probability_late": float(p)} for p in probs]}

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--version", required=True)
    args = parser.parse_args()
    uvicorn.run(make_app(args.version), host="127.0.0.1", port=args.port, log_level="error")
