"""The feedback store: a SQLite table that serving writes and the collect stage reads.

`received` is a record as serving stores it (cleaned and PII-masked; without an id, one derived
from text and label), `screen` judges each row for collect, `delete` logs what it removes. `seq`
(the rowid) orders rows by arrival and is never reused; a data version's watermark is the newest
seq it read. Schema: docs/data.md#sources; why: docs/decisions/0010-feedback-hygiene.md, 0009.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import sqlite3
import uuid
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from flywheel import stores
from flywheel.config import ValidateConfig
from flywheel.errors import FlywheelError
from flywheel.io import write_atomic
from flywheel.pii import clean_and_mask
from flywheel.text import normalised_key

SCHEMA_VERSION = 3
SOURCE = "feedback"  # the `source` of feedback rows in the collected data
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
DELETION_COLUMNS = (
    "seq",
    "id",
    "label",
    "source",
    "created_at",
    "deleted_at",
    "user",
    "reason",
)

_DELETIONS_DDL = """
CREATE TABLE IF NOT EXISTS feedback_deletions (
    seq        INTEGER NOT NULL,
    id         TEXT NOT NULL,
    label      TEXT,
    source     TEXT,
    created_at TEXT,
    deleted_at TEXT NOT NULL,
    user       TEXT NOT NULL,
    reason     TEXT NOT NULL
)
"""
_DDL = (
    """
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
CREATE INDEX IF NOT EXISTS feedback_created_at ON feedback (created_at);
"""
    + _DELETIONS_DDL
)
_MIGRATIONS = {1: "ALTER TABLE feedback ADD COLUMN prediction_id TEXT", 2: _DELETIONS_DDL}
# The rowid is given explicitly: past the newest stored and the newest deleted row.
_INSERT = (
    f"INSERT INTO feedback (rowid, {', '.join(COLUMNS)}) VALUES ("
    "1 + max(coalesce((SELECT max(rowid) FROM feedback), 0), "
    "coalesce((SELECT max(seq) FROM feedback_deletions), 0)), "
    f"{', '.join('?' * len(COLUMNS))}) ON CONFLICT(id) DO NOTHING"
)


class FeedbackError(FlywheelError, ValueError):
    """A feedback operation that cannot be done as asked; the message says why."""


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


def derived_id(text: str, label: str) -> str:
    """The id of feedback sent without one: the same (normalised) text and label, the same id."""
    return hashlib.sha256(f"{normalised_key(text)}\x1f{label.strip()}".encode()).hexdigest()[:32]


def received(
    text: str, label: str, mask: Sequence[str], id: str | None = None, **fields: str | None
) -> tuple[FeedbackRecord, Counter[str]]:
    """A record as the store keeps what a user sent (text cleaned and PII-masked, id derived
    when none is given), and the PII kinds masked in it. The text may come out empty."""
    text, masked = clean_and_mask(text, mask)
    record = FeedbackRecord(text=text, label=label, id=id or derived_id(text, label), **fields)
    return record, masked


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating or migrating if needed) a feedback store for writing."""
    return stores.open_store(path, _DDL, SCHEMA_VERSION, _MIGRATIONS)


def add(path: Path, records: Iterable[FeedbackRecord]) -> int:
    """Insert records as they are; ids already present are skipped. Returns how many rows were
    new. Serving masks first (`received`); callers with raw text do the same."""
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


# --- screening: each row judged on its own before it is merged ---------------------------------

ACCEPTED, REPEAT, QUARANTINED = "accepted", "repeat", "quarantined"


@dataclass(frozen=True)
class ScreenSummary:
    """What the collect stage did with the store's rows: how many it read, took, dropped as
    repeats and quarantined (by reason), and the newest seq it read (its watermark)."""

    read: int
    accepted: int
    repeats: int
    quarantined: dict[str, int]
    newest_seq: int

    def line(self) -> str:
        """One line for logs and run summaries."""
        out = (
            f"{self.read:,} feedback rows read: {self.accepted:,} accepted, "
            f"{self.repeats:,} repeats dropped, {sum(self.quarantined.values()):,} quarantined"
        )
        if self.quarantined:
            out += " (" + "; ".join(f"{n:,} {why}" for why, n in self.quarantined.items()) + ")"
        return out


def screen(
    frame: pd.DataFrame, rules: ValidateConfig, mask: Sequence[str], known_labels: Collection[str]
) -> pd.DataFrame:
    """Judge each feedback row (as `read` gives them) by the validation gate's row checks.

    Adds `status` (accepted, repeat, quarantined) and `reason`. Quarantined: no text or nothing
    left after cleaning, shorter or longer than the validate bounds, no label, or a label
    outside validate.labels (when null: outside `known_labels`, the other sources' labels).
    Repeat: the same normalised, masked text and label as an earlier accepted row; the clean
    stage would drop it anyway. The same text with another label is accepted: a conflict the
    clean stage resolves.
    """
    allowed = set(rules.labels) if rules.labels is not None else set(known_labels)
    where = "validate.labels" if rules.labels is not None else "the other sources' labels"
    status, reasons, seen = [], [], set()
    for text, label in zip(frame["text"], frame["label"], strict=True):
        text = "" if pd.isna(text) else str(text)
        label = "" if pd.isna(label) else str(label)
        as_cleaned = clean_and_mask(text, mask)[0]
        key, reason = normalised_key(as_cleaned), None
        if not as_cleaned:
            reason = "empty (nothing left after cleaning)"
        elif len(text.strip()) < rules.min_text_chars:
            reason = f"shorter than validate.min_text_chars ({rules.min_text_chars:,})"
        elif len(text) > rules.max_text_chars:
            reason = f"longer than validate.max_text_chars ({rules.max_text_chars:,})"
        elif not label.strip():
            reason = "no label"
        elif label not in allowed:
            reason = f"label not in {where}"
        if reason is not None:
            status.append(QUARANTINED)
            reasons.append(reason)
        elif (key, label.strip()) in seen:
            status.append(REPEAT)
            reasons.append("same text and label as an earlier row")
        else:
            seen.add((key, label.strip()))
            status.append(ACCEPTED)
            reasons.append(None)
    return frame.assign(
        status=pd.array(status, dtype="string"), reason=pd.array(reasons, dtype="string")
    )


def summarise(screened: pd.DataFrame) -> ScreenSummary:
    """The counts of a screened table."""
    status = screened["status"]
    quarantined = screened.loc[status == QUARANTINED, "reason"].value_counts()
    return ScreenSummary(
        read=len(screened),
        accepted=int((status == ACCEPTED).sum()),
        repeats=int((status == REPEAT).sum()),
        quarantined={str(k): int(v) for k, v in sorted(quarantined.items())},
        newest_seq=int(screened["seq"].max()) if len(screened) else 0,
    )


# --- inspection and removal (`flywheel feedback ...`) -------------------------------------------


def select(
    frame: pd.DataFrame,
    ids: Sequence[str] | None = None,
    label: str | None = None,
    source: str | None = None,
    left_out: bool = False,
    limit: int | None = None,
) -> pd.DataFrame:
    """Rows with these ids, label and/or source (and with `left_out`, only those a screened
    table marks as left out of the data), newest first, at most `limit`."""
    if ids is not None:
        frame = frame[frame["id"].isin(list(ids))]
    if label is not None:
        frame = frame[frame["label"] == label]
    if source is not None:
        frame = frame[frame["source"] == source]
    if left_out:
        frame = frame[frame["status"] != ACCEPTED]
    frame = frame.sort_values("seq", ascending=False)
    return (frame if limit is None else frame.head(limit)).reset_index(drop=True)


def deletions(path: Path) -> pd.DataFrame:
    """The deletion log, oldest first (empty for a store that never had a deletion)."""
    exists = stores.read_frame(
        path, SCHEMA_VERSION, "SELECT 1 FROM sqlite_master WHERE name = 'feedback_deletions'"
    )
    if exists is None or exists.empty:
        return pd.DataFrame({c: pd.Series(dtype="string") for c in DELETION_COLUMNS})
    frame = stores.read_frame(
        path,
        SCHEMA_VERSION,
        f"SELECT {', '.join(DELETION_COLUMNS)} FROM feedback_deletions ORDER BY rowid",
    )
    return frame.astype({c: "string" for c in DELETION_COLUMNS if c != "seq"})


def os_user() -> str:
    """Who runs this process (the OS user; the uid when it has no name)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container uid without a passwd entry
        return f"uid {os.getuid()}"


def _all_found(found: pd.DataFrame, wanted: list[str], path: Path) -> pd.DataFrame:
    missing = [i for i in wanted if i not in set(found["id"])]
    if missing:
        raise FeedbackError(
            f"{path}: no feedback with id {', '.join(missing)}; nothing deleted "
            "(`flywheel feedback list` shows the ids)"
        )
    return found[["seq", *COLUMNS]].reset_index(drop=True)


def delete(
    path: Path, ids: Sequence[str], user: str, reason: str, dry_run: bool = False
) -> pd.DataFrame:
    """Delete rows by id and log each in `feedback_deletions`, in one transaction; returns the
    rows deleted (with `dry_run`: the rows it would delete, the file untouched). An id not in
    the store is an error and nothing is deleted."""
    wanted = list(dict.fromkeys(ids))
    if not wanted:
        raise FeedbackError("name at least one feedback id to delete")
    if not path.exists():
        raise FeedbackError(f"{path}: no feedback store; nothing deleted")
    if dry_run:
        stored = read(path)
        return _all_found(stored[stored["id"].isin(wanted)], wanted, path)
    conn = connect(path)
    try:
        conn.isolation_level = None
        conn.execute("BEGIN IMMEDIATE")  # no writer between the check and the delete
        marks = ", ".join("?" * len(wanted))
        found = _all_found(
            pd.read_sql_query(
                f"SELECT rowid AS seq, * FROM feedback WHERE id IN ({marks}) ORDER BY rowid",
                conn,
                params=wanted,
            ),
            wanted,
            path,
        )
        now = datetime.now(UTC).isoformat(timespec="seconds")
        conn.executemany(
            f"INSERT INTO feedback_deletions ({', '.join(DELETION_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(DELETION_COLUMNS))})",
            [
                (int(r.seq), r.id, r.label, r.source, r.created_at, now, user, reason)
                for r in found.itertuples()
            ],
        )
        conn.execute(f"DELETE FROM feedback WHERE id IN ({marks})", wanted)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()
    return found


EXPORT_FORMATS = (".csv", ".jsonl")


def export(path: Path, target: Path) -> int:
    """Write every row (with its seq) to a CSV or JSONL file, chosen by the suffix; returns the
    number of rows. The file appears whole or not at all."""
    suffix = target.suffix.lower()
    if suffix not in EXPORT_FORMATS:
        raise FeedbackError(
            f"{target}: cannot tell the format from {suffix or 'no suffix'!r}; "
            f"name the file *{' or *'.join(EXPORT_FORMATS)}"
        )
    frame = read(path)
    if suffix == ".csv":
        write_atomic(target, lambda tmp: frame.to_csv(tmp, index=False))
    else:
        write_atomic(
            target,
            lambda tmp: frame.to_json(tmp, orient="records", lines=True, force_ascii=False),
        )
    return len(frame)
