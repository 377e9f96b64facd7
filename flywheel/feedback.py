"""The feedback store: a SQLite table that serving writes and the collect stage reads.

Schema (version 2):

    feedback(
      id              TEXT PRIMARY KEY,  -- idempotency key: a repeated id is ignored
      text            TEXT NOT NULL,     -- the text the user sent, as received
      label           TEXT NOT NULL,     -- the label the user says is right
      predicted_label TEXT,              -- what the model answered, if known
      model_version   TEXT,              -- registry version that answered, if known
      created_at      TEXT NOT NULL,     -- ISO 8601 UTC
      source          TEXT NOT NULL,     -- who wrote it: 'api', 'demo', 'import', ...
      prediction_id   TEXT               -- the /predict answer this is about, if known (v2)
    )

SQLite's rowid orders rows by arrival (`seq` when read): a data version records the newest seq
it holds, so "feedback newer than the champion's data" is `seq > that watermark`.
Texts are stored as received; PII is masked when feedback enters a data version (clean stage),
so nothing unmasked is versioned or trained on.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from flywheel import stores

SCHEMA_VERSION = 2
COLUMNS = (
    "id",
    "text",
    "label",
    "predicted_label",
    "model_version",
    "created_at",
    "source",
    "prediction_id",
)

_DDL = """
CREATE TABLE IF NOT EXISTS feedback (
    id              TEXT PRIMARY KEY,
    text            TEXT NOT NULL CHECK (length(trim(text)) > 0),
    label           TEXT NOT NULL CHECK (length(trim(label)) > 0),
    predicted_label TEXT,
    model_version   TEXT,
    created_at      TEXT NOT NULL,
    source          TEXT NOT NULL DEFAULT 'api',
    prediction_id   TEXT
);
CREATE INDEX IF NOT EXISTS feedback_created_at ON feedback (created_at)
"""
_MIGRATIONS = {1: "ALTER TABLE feedback ADD COLUMN prediction_id TEXT"}
_INSERT = (
    f"INSERT INTO feedback ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
    "ON CONFLICT(id) DO NOTHING"
)


@dataclass(frozen=True)
class FeedbackRecord:
    """One piece of feedback: the text and the label a user says is right."""

    text: str
    label: str
    predicted_label: str | None = None
    model_version: str | None = None
    source: str = "api"
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    prediction_id: str | None = None


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating or migrating if needed) a feedback store for writing."""
    return stores.open_store(path, _DDL, SCHEMA_VERSION, _MIGRATIONS)


def add(path: Path, records: Iterable[FeedbackRecord]) -> int:
    """Insert records; ids already present are skipped. Returns how many rows were new."""
    rows = [tuple(getattr(r, c) for c in COLUMNS) for r in records]
    conn = connect(path)
    try:
        with conn:
            before = conn.total_changes
            conn.executemany(_INSERT, rows)
            return conn.total_changes - before
    finally:
        conn.close()


def read(path: Path, after_seq: int = 0) -> pd.DataFrame:
    """Feedback rows (all, or those with seq > after_seq) in arrival order, with their `seq`;
    an absent or empty store reads as an empty table.

    Opens the file read-only: reading must not change its bytes (it is a DVC dependency) nor
    take the write lock that serving needs. A version-1 store reads with no prediction ids.
    """
    frame = stores.read_frame(
        path,
        SCHEMA_VERSION,
        "SELECT rowid AS seq, * FROM feedback WHERE rowid > ? ORDER BY rowid",
        (after_seq,),
    )
    if frame is None:
        frame = pd.DataFrame({c: [] for c in ("seq", *COLUMNS)})
    for column in COLUMNS:
        if column not in frame:
            frame[column] = None
    out = frame[list(COLUMNS)].astype("string")
    out.insert(0, "seq", frame["seq"].astype("int64"))
    return out
