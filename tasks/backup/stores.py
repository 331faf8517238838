"""MLflow tracking stores in a backup: SQLite snapshots, PostgreSQL dumps, artifact locations."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from mlops.backups import redact_uri
from mlops.errors import BackupError, one_line


def sqlite_snapshot(db_path: str, out_path: str) -> None:
    """A consistent copy of a live SQLite database through its online backup API."""
    src = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(out_path)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


def dump_tracking_store(store_uri: str, workdir: str) -> tuple[str, str] | None:
    """(snapshot path, local file) of the MLflow backend store, or None for a server store."""
    if store_uri.startswith("sqlite:///"):
        db = store_uri.removeprefix("sqlite:///")
        db = db if db.startswith("/") else os.path.abspath(db)
        if not os.path.exists(db):
            return None
        out = os.path.join(workdir, "mlflow.db")
        sqlite_snapshot(db, out)
        return "mlflow/mlflow.db", out
    if is_postgres(store_uri):
        out = os.path.join(workdir, "mlflow.sql")
        uri, env = pg_conninfo(store_uri)
        done = subprocess.run(
            ["pg_dump", "--no-owner", "--no-privileges", "--format=plain", "--file", out,
             "--dbname", uri],
            capture_output=True, text=True, timeout=3600, env={**os.environ, **env},
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"pg_dump failed: {_first_line(done.stderr)}")
        return "mlflow/mlflow.sql", out
    return None


PG_SCHEMES = ("postgresql://", "postgresql+psycopg2://", "postgres://")


def is_postgres(uri: str) -> bool:
    return uri.startswith(PG_SCHEMES)


def pg_conninfo(uri: str) -> tuple[str, dict[str, str]]:
    """A libpq URI without its password, and the environment that carries the password.

    The password never reaches a command line (where ``ps`` shows it) or a log.
    """
    uri = uri.replace("postgresql+psycopg2://", "postgresql://", 1)
    parts = urlsplit(uri)
    if not parts.password:
        return uri, {}
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}@{host}" if parts.username else host
    return urlunsplit(parts._replace(netloc=netloc)), {"PGPASSWORD": unquote(parts.password)}


def _pg_connect(uri: str, dbname: str | None = None) -> Any:
    import psycopg2

    plain, env = pg_conninfo(uri)
    kwargs: dict[str, Any] = {"connect_timeout": 10}
    if env:
        kwargs["password"] = env["PGPASSWORD"]
    if dbname:
        kwargs["dbname"] = dbname
    try:
        return psycopg2.connect(plain, **kwargs)
    except psycopg2.Error as exc:
        raise BackupError(f"database {redact_uri(uri)} is unreachable: {one_line(exc)}") from None


def pg_user_tables(uri: str) -> int:
    """How many tables a PostgreSQL database holds outside the system schemas."""
    conn = _pg_connect(uri)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM information_schema.tables "
                "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
            )
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def load_pg_dump(dump: str, uri: str, old_artifacts: str, new_artifacts: str) -> None:
    """Load a plain pg_dump into an empty database in one transaction, then point its
    artifact locations at the restored artifacts. A failed load leaves the database empty."""
    plain, env = pg_conninfo(uri)
    done = subprocess.run(
        ["psql", "--no-psqlrc", "--quiet", "--single-transaction", "-v", "ON_ERROR_STOP=1",
         "--file", dump, "--dbname", plain],
        capture_output=True, text=True, timeout=3600, env={**os.environ, **env},
    )  # fmt: skip
    if done.returncode != 0:
        raise BackupError(f"loading the MLflow dump failed: {_first_line(done.stderr)}")
    if old_artifacts:
        conn = _pg_connect(uri)
        try:
            with conn:  # one transaction
                rewrite_artifact_locations_in(conn, "%s", old_artifacts, new_artifacts)
        finally:
            conn.close()


def scratch_database(uri: str, label: str) -> str:
    """Create an empty database beside ``uri``'s (same server and credentials); its URI."""
    import secrets

    name = f"mlops_{label}_{secrets.token_hex(4)}"
    _pg_admin(uri, f'CREATE DATABASE "{name}"')
    return urlunsplit(urlsplit(uri)._replace(path=f"/{name}"))


def drop_database(uri: str) -> None:
    name = urlsplit(uri).path.lstrip("/")
    _pg_admin(uri, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', dbname="postgres")


def _pg_admin(uri: str, statement: str, dbname: str | None = None) -> None:
    """One statement outside a transaction (CREATE/DROP DATABASE need that)."""
    conn = _pg_connect(uri, dbname=dbname)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


ARTIFACT_COLUMNS = {
    "experiments": ("artifact_location",),
    "runs": ("artifact_uri",),
    "model_versions": ("source", "storage_location"),
    "logged_models": ("artifact_location",),
}


PROXIED = "mlflow-artifacts:"


def rewrite_artifact_locations_in(conn: Any, placeholder: str, old_root: str, new_root: str) -> int:
    """Replace ``old_root`` by ``new_root`` in the MLflow store's artifact locations.

    ``conn`` is a DB-API connection to SQLite (placeholder ``?``) or PostgreSQL (``%s``); the
    caller commits.
    """
    old_root = old_root.rstrip("/").removeprefix("file://")
    new_root = new_root.rstrip("/")
    # Whole path prefixes only: "/a/b" moves "/a/b/c", never "/a/bc".
    prefixes = [(f"{old_root}/", f"{new_root}/"), (f"{PROXIED}/", f"{new_root}/")]
    if old_root.startswith("/"):
        prefixes.append((f"file://{old_root}/", f"file://{new_root}/"))
    cur = conn.cursor()
    if placeholder == "?":
        cur.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        cur.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
    tables = {r[0] for r in cur.fetchall()}
    changed = 0
    for table, cols in ARTIFACT_COLUMNS.items():
        if table not in tables:
            continue
        cur.execute(f"SELECT * FROM {table} LIMIT 0")
        have = {d[0] for d in cur.description}
        for col in cols:
            if col not in have:
                continue
            # A tracking server that proxies artifacts records them as mlflow-artifacts:/...,
            # relative to its artifact destination, which is the root that was backed up.
            for old, new in prefixes:
                cur.execute(
                    f"UPDATE {table} SET {col} = {placeholder} || substr({col}, {len(old) + 1}) "
                    f"WHERE substr({col}, 1, {len(old)}) = {placeholder}",
                    (new, old),
                )
                changed += max(cur.rowcount, 0)
    return changed


def rewrite_artifact_locations(db_path: str, old_root: str, new_root: str) -> int:
    """Point a restored SQLite MLflow store's artifact locations at the restored artifacts."""
    con = sqlite3.connect(db_path)
    try:
        changed = rewrite_artifact_locations_in(con, "?", old_root, new_root)
        con.commit()
    finally:
        con.close()
    return changed


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""
