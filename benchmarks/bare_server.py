"""The baseline server: the same model and per-request work behind bare FastAPI + uvicorn.

python benchmarks/bare_server.py --port 8100 --version 3   (MLOPS_* settings from the env)

Per request it does what the Serve application does: parse and validate the body (known
carriers included), build the features, score them with the same ``Scorer`` and hand the rows
to an inference log (written under a temporary directory, not the data lake).
"""

# No ``from __future__ import annotations``: FastAPI reads the annotations at runtime.

import argparse
import tempfile

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response


def make_app(version: str, log_root: str) -> FastAPI:
    from mlops.lake import load_lookups, read_carriers
    from mlops.registry import ModelRegistry, load_booster
    from mlops.settings import load_settings
    from mlops.storage import Storage
    from serving.app import MAX_ROWS_PER_REQUEST, Scorer
    from serving.inference_log import InferenceLog
    from serving.request import json_response, validate_body

    settings = load_settings()
    booster = load_booster(settings.mlflow_tracking_uri, settings.model_name, version)
    booster.set_param({"nthread": 1})
    lineage = ModelRegistry(settings).version_info(version).lineage
    storage = Storage(settings.storage_root, settings.storage_options)
    dims_uri = storage.uri(lineage.dims_rel)
    lookups = load_lookups(dims_uri, settings.storage_options)
    carriers = frozenset(read_carriers(dims_uri, settings.storage_options))
    scorer = Scorer(booster, lookups, settings.model_name, version)
    inference_log = InferenceLog(log_root, {})
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        status, rows = validate_body(await request.body(), carriers, MAX_ROWS_PER_REQUEST)
        if status != 200:
            return json_response({"detail": rows}, status_code=status)
        answers, logged = scorer.score(rows)
        if logged is not None:
            inference_log.append(logged)
        return Response(scorer.answer(answers), media_type="application/json")

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--version", required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bare-inference-log-") as log_root:
        app = make_app(args.version, log_root)
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="error")
