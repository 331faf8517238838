"""Real local components, started once per session: S3 on loopback, Ray, a Prefect API."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from mlops.runtime import Runtime, free_port, runtime
from mlops.settings import load_settings


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (the same way s3fs's own tests run)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = url
    try:
        yield url
    finally:
        server.stop()
        os.environ.pop("AWS_ENDPOINT_URL", None)


@pytest.fixture(scope="session")
def platform(s3_endpoint: str) -> Iterator[Runtime]:
    """One embedded Ray and one Prefect API for the whole session, as `mlops run` starts them."""
    with runtime(load_settings()) as rt:
        yield rt
