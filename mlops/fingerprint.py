"""Stable hashes of inputs and code, used as cache keys and lineage tags."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

_CODE_PACKAGES = ("cli", "mlops", "serving", "tasks", "flows", "deployments")


def fingerprint(*parts: Any) -> str:
    """A short sha256 of JSON-able parts (dataclasses and sets are handled by ``default=str``)."""
    payload = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


@lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the project's own source files: a change to any stage changes every cache key."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in _CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]
