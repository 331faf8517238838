"""Stable hashes of inputs and code, used as cache keys and lineage tags."""

from __future__ import annotations

import ast
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


def _source_of(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


@lru_cache(maxsize=8)
def import_closure(module: str, packages: tuple[str, ...]) -> tuple[str, ...]:
    """Source files (relative paths) of ``module`` and of every module of ``packages`` it imports.

    Read statically, at any depth and including imports inside functions, so every process gets
    the same answer whatever it has imported already.
    """
    root = Path(__file__).resolve().parent.parent
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _source_of(root, name)
        if path is None:  # a name imported from a module, not a module
            continue
        seen[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run too
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            todo += [n for n in names if n.split(".")[0] in packages]
    return tuple(sorted(p.relative_to(root).as_posix() for p in seen.values()))


def source_digest(module: str, packages: tuple[str, ...]) -> str:
    """sha256 of the files of :func:`import_closure`, names included."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for rel in import_closure(module, packages):
        digest.update(rel.encode())
        digest.update((root / rel).read_bytes())
    return digest.hexdigest()
