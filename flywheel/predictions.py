"""The prediction log: what the server answered, kept so that drift can be computed over a
window of recent traffic (`flywheel monitor`, the retrain check).

`PredictionLog` is the server's writer (WAL mode, pruned to monitor.keep_predictions rows; no raw
text unless monitor.log_text); `read` feeds drift, `lookup` the feedback intake. Schema:
docs/serving.md; why: docs/decisions/0009-serving-feedback-and-retrain-trigger.md.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from flywheel import stores

SCHEMA_VERSION = 1
_DDL = """
CREATE TABLE IF NOT EXISTS predictions (
    id            TEXT PRIMARY KEY,
    created_at    TEXT NOT NULL,
    model_version TEXT NOT NULL,
    text_sha256   TEXT NOT NULL,
    length        INTEGER NOT NULL,
    label         TEXT NOT NULL,
    confidence    REAL NOT NULL,
    oov_rate      REAL,
    text          TEXT
);
CREATE INDEX IF NOT EXISTS predictions_version ON predictions (model_version, created_at)
"""


@dataclass(frozen=True)
class LoggedPrediction:
    id: str
    created_at: str
    model_version: str
    text_sha256: str
    length: int
    label: str
    confidence: float
    oov_rate: float | None
    text: str | None = None


COLUMNS = tuple(f.name for f in fields(LoggedPrediction))
_INSERT = f"INSERT INTO predictions ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class PredictionLog:
    """The server's writer: one connection, writes serialised, older rows pruned now and then."""

    PRUNE_EVERY = 1000  # rows written between prunings

    def __init__(self, path: Path, keep: int):
        self.path, self.keep = path, keep
        self._conn: sqlite3.Connection = stores.open_store(path, _DDL, SCHEMA_VERSION, wal=True)
        self._lock = threading.Lock()
        self._since_prune = 0

    def write(self, rows: Sequence[LoggedPrediction]) -> None:
        with self._lock, self._conn:
            self._conn.executemany(_INSERT, [astuple(r) for r in rows])
            self._since_prune += len(rows)
            if self._since_prune >= self.PRUNE_EVERY:
                self._since_prune = 0
                self._conn.execute(
                    "DELETE FROM predictions WHERE rowid <= "
                    "(SELECT max(rowid) FROM predictions) - ?",
                    (self.keep,),
                )

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def read(path: Path, model_version: str | None = None, limit: int | None = None) -> pd.DataFrame:
    """The newest `limit` predictions (of one model version, or all), oldest first; an absent
    log reads as an empty table."""
    where, params = ("WHERE model_version = ?", (model_version,)) if model_version else ("", ())
    query = f"SELECT rowid AS seq, * FROM predictions {where} ORDER BY rowid DESC LIMIT ?"
    frame = stores.read_frame(path, SCHEMA_VERSION, query, (*params, limit or -1))
    if frame is None:
        frame = pd.DataFrame({c: [] for c in ("seq", *COLUMNS)})
    return frame.iloc[::-1].reset_index(drop=True)


def lookup(path: Path, prediction_id: str) -> pd.Series | None:
    """One logged prediction by id, or None."""
    frame = stores.read_frame(
        path, SCHEMA_VERSION, "SELECT * FROM predictions WHERE id = ?", (prediction_id,)
    )
    return None if frame is None or frame.empty else frame.iloc[0]
