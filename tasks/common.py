"""What every stage task shares: retries for transient errors only, and input-keyed caching."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from mlops.errors import NON_RETRYABLE
from mlops.fingerprint import code_version, fingerprint


def retry_transient(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry I/O and network failures; never retry bad input, validation or promotion gates."""
    try:
        state.result()
    except NON_RETRYABLE:
        return False
    except Exception:
        return True
    return False


KeyParts = Callable[[dict[str, Any]], Any]


def input_cache_key(parts: KeyParts) -> Callable[[Any, dict[str, Any]], str]:
    """Cache on what ``parts`` picks from the parameters plus the code version.

    Keys are built from locations, windows, configs and upstream fingerprints, never DataFrames.
    """

    def key(_context: Any, parameters: dict[str, Any]) -> str:
        return f"{fingerprint(parts(parameters))}-{code_version()}"

    return key


def stage(name: str, *, cache_on: KeyParts | None = None, retries: int = 2) -> Callable:
    """Decorate a stage's wrapper as a Prefect task with the project's retry and cache policy.

    ``cache_on`` maps the call's parameters to the inputs that matter; without it the stage always
    runs (stages that read or move live registry or serving state).
    """
    options: dict[str, Any] = {
        "name": name,
        "retries": retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=2),
        "retry_jitter_factor": 0.5,
        "retry_condition_fn": retry_transient,
    }
    if cache_on is not None:
        options.update(cache_key_fn=input_cache_key(cache_on), persist_result=True)
    else:
        options.update(cache_policy=NO_CACHE, persist_result=False)
    return task(**options)
