"""Shared test set-up.

Prefect reads its settings once, at import, so everything it must see is set here, before any
test module imports it: a private MLOPS_HOME, a Prefect home and the port of the one Prefect API
the integration tests start. Tests are hermetic: servers named in the caller's environment are
ignored.
"""

from __future__ import annotations

import os
import tempfile

for _var in (
    "PREFECT_API_URL",
    "MLFLOW_TRACKING_URI",
    "RAY_ADDRESS",
    "MLOPS_STORAGE_ROOT",
    "MLOPS_MLFLOW_TRACKING_URI",
    "MLOPS_RAY_ADDRESS",
    "MLOPS_PREFECT_API_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
):
    os.environ.pop(_var, None)

SESSION_DIR = tempfile.mkdtemp(prefix="mlops-tests-")
os.environ["MLOPS_HOME"] = os.path.join(SESSION_DIR, "home")
os.environ.setdefault("MLOPS_RAY_NUM_CPUS", "2")
# One router replica (the default is 2): each loads the model, which costs the 2-core test
# machine seconds per deployment. The production-profile test runs the default.
os.environ.setdefault("MLOPS_SERVE_ROUTER_REPLICAS", "1")
# Fake credentials for the loopback S3 endpoint (moto); never real ones.
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "GX_ANALYTICS_ENABLED": "false",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
        # Ray exports custom metrics every second instead of every 10 s: the metrics test reads
        # counters once they have settled.
        "RAY_metrics_report_interval_ms": "1000",
    }
)

from mlops.runtime import free_port, prepare_process  # noqa: E402
from mlops.settings import load_settings  # noqa: E402

os.environ["MLOPS_SERVE_PORT"] = str(free_port())
# Serve's HAProxy ingress also binds a stats, a metrics and a fallback-proxy port (8404, 9101,
# 8500 by default): free ones, so that a second Serve instance on this machine (the
# production-profile cluster, a developer's own) cannot collide with the session's. A router
# replica that stops drains for 2 s here instead of Ray's 30 s for external load balancers.
os.environ.update(
    {
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }
)
prepare_process(load_settings(), launch_api=False)  # PREFECT_HOME, the local PREFECT_API_URL
