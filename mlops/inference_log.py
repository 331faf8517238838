"""The inference log: every answered request, appended in batches off the request path.

Rows are buffered in memory and written by a background thread as Parquet files under
``<storage_root>/inference_log/date=YYYY-MM-DD/``. Each file appears atomically. Losing the log
never fails a request: a failed write is counted and logged, and the rows are dropped.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

LOG_DIR = "inference_log"


class InferenceLog:
    def __init__(
        self,
        storage_root: str,
        storage_options: dict[str, Any],
        flush_every_s: float = 2.0,
        max_rows: int = 20_000,
    ) -> None:
        self._root = storage_root
        self._options = storage_options
        self._flush_every_s = flush_every_s
        self._max_rows = max_rows
        self._frames: list[Any] = []
        self._buffered = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.written = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._loop, name="inference-log", daemon=True)
        self._thread.start()

    def append(self, rows: Any) -> None:
        """O(1) on the request path: hand rows to the writer, which builds the frames.

        ``rows`` is a DataFrame, a list of row dicts, or a dict of equally long columns (scalars
        repeat); turning them into a DataFrame costs about a millisecond, so the writer does it.
        """
        n = _count(rows)
        with self._lock:
            self._frames.append(rows)
            self._buffered += n
            full = self._buffered >= self._max_rows
        if full:
            self._wake.set()

    def flush(self) -> int:
        """Write what is buffered now; returns the number of rows written."""
        with self._lock:
            frames, self._frames, n = self._frames, [], self._buffered
            self._buffered = 0
        if not frames:
            return 0
        try:
            import pandas as pd
            import pyarrow as pa

            from mlops.storage import Storage

            day = datetime.now(UTC).strftime("%Y-%m-%d")
            frame = pd.concat(
                [f if isinstance(f, pd.DataFrame) else pd.DataFrame(f) for f in frames],
                ignore_index=True,
            )
            table = pa.Table.from_pandas(frame, preserve_index=False)
            Storage(self._root, self._options).write_parquet(
                f"{LOG_DIR}/date={day}/{uuid.uuid4().hex}.parquet", table
            )
            self.written += n
            return n
        except Exception as exc:
            self.dropped += n
            log.warning("inference log write failed, %d rows dropped: %s", n, exc)
            return 0

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self.flush()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._flush_every_s)
            self._wake.clear()
            self.flush()
            time.sleep(0)


def _count(rows: Any) -> int:
    """Rows in a DataFrame, a list of row dicts or a dict of columns (its longest column)."""
    if isinstance(rows, dict):
        return max(
            (len(v) for v in rows.values() if hasattr(v, "__len__") and not isinstance(v, str)),
            default=1,
        )
    return len(rows)
