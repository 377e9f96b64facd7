"""The feedback store: a SQLite table that serving writes and the collect stage reads.

Schema (version 1):

    feedback(
      id              TEXT PRIMARY KEY,  -- idempotency key: a repeated id is ignored
      text            TEXT NOT NULL,     -- the text the user sent, as received
      label           TEXT NOT NULL,     -- the label the user says is right
      predicted_label TEXT,              -- what the model answered, if known
      model_version   TEXT,              -- registry version that answered, if known
      created_at      TEXT NOT NULL,     -- ISO 8601 UTC
      source          TEXT NOT NULL      -- who wrote it: 'api', 'demo', 'import', ...
    )

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

SCHEMA_VERSION = 1
COLUMNS = ("id", "text", "label", "predicted_label", "model_version", "created_at", "source")

_DDL = """
CREATE TABLE IF NOT EXISTS feedback (
    id              TEXT PRIMARY KEY,
    text            TEXT NOT NULL CHECK (length(trim(text)) > 0),
    label           TEXT NOT NULL CHECK (length(trim(label)) > 0),
    predicted_label TEXT,
    model_version   TEXT,
    created_at      TEXT NOT NULL,
    source          TEXT NOT NULL DEFAULT 'api'
);
CREATE INDEX IF NOT EXISTS feedback_created_at ON feedback (created_at);
"""
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


def _check_version(conn: sqlite3.Connection, path: Path) -> int:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, SCHEMA_VERSION):
        conn.close()
        raise RuntimeError(
            f"{path}: feedback store schema version {version}, this flywheel reads {SCHEMA_VERSION}"
        )
    return version


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) a feedback store for writing and check its schema version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30)
    _check_version(conn, path)
    with conn:
        conn.executescript(_DDL)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return conn


def add(path: Path, records: Iterable[FeedbackRecord]) -> int:
    """Insert records; ids already present are skipped. Returns how many rows were new."""
    rows = [tuple(getattr(r, c) for c in COLUMNS) for r in records]
    conn = connect(path)
    try:
        with conn:
            before = conn.total_changes
            conn.executemany(
                _INSERT,
                rows,
            )
            return conn.total_changes - before
    finally:
        conn.close()


def read(path: Path) -> pd.DataFrame:
    """All feedback rows, oldest first; an absent or empty store reads as an empty table.

    Opens the file read-only: reading must not change its bytes (it is a DVC dependency) nor
    take the write lock that serving needs.
    """
    empty = pd.DataFrame({c: pd.Series(dtype="string") for c in COLUMNS})
    if not path.exists():
        return empty
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        if _check_version(conn, path) == 0:
            return empty  # created but never initialised
        frame = pd.read_sql_query(
            f"SELECT {', '.join(COLUMNS)} FROM feedback ORDER BY created_at, id", conn
        )
    finally:
        conn.close()
    return frame.astype("string")
