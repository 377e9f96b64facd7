"""SQLite stores (the feedback store, the prediction log): opened with a schema version that is
checked and migrated forward, and read through read-only connections that never write the file
nor take the writers' lock (except once after a writer died mid-transaction: see read_frame)."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from flywheel.errors import FlywheelError

BUSY_TIMEOUT_SECONDS = 30  # concurrent writers wait for each other instead of failing
# What a read-only connection meets when a writer was killed mid-transaction: a hot rollback
# journal (or a WAL index to rebuild) that only a read-write connection may resolve.
_LEFT_BY_A_DEAD_WRITER = ("SQLITE_READONLY_ROLLBACK", "SQLITE_READONLY_RECOVERY")


class StoreError(FlywheelError, ValueError):
    """A file that is not a store Flywheel can use: not SQLite, or another program's database."""


class StoreVersionError(StoreError):
    """A store written by a newer Flywheel."""


def _version(conn: sqlite3.Connection, path: Path, latest: int) -> int:
    """The store's schema version (0: new, empty); refuses a file that is not SQLite, one that
    holds another program's tables, and one written by a newer Flywheel."""
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master")]
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError) and (
            "locked" in str(exc) or getattr(exc, "sqlite_errorname", "") in _LEFT_BY_A_DEAD_WRITER
        ):
            raise
        raise StoreError(f"{path}: not an SQLite database ({exc})") from None
    if version > latest:
        raise StoreVersionError(
            f"{path}: store schema version {version}, this flywheel reads up to {latest}"
        )
    if version == 0 and tables:
        raise StoreError(
            f"{path}: another program's SQLite database (tables: {', '.join(sorted(tables))}), "
            "not a Flywheel store"
        )
    return version


def open_store(
    path: Path,
    ddl: str,
    version: int,
    migrations: Mapping[int, str] | None = None,
    wal: bool = False,
) -> sqlite3.Connection:
    """Open a store for writing, creating it with `ddl` or migrating it to `version`.

    `migrations[v]` is the SQL that takes schema v to v + 1. WAL lets readers run beside a
    writer; it is off for stores whose file itself is a DVC dependency (WAL keeps recent rows
    in a side file).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, check_same_thread=False)
    try:
        if wal:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        if _version(conn, path, version) == version:
            return conn
        # One transaction, statement by statement (executescript would commit first): a store
        # is never left half-created or half-migrated, and two writers do not both migrate it.
        conn.isolation_level = None
        conn.execute("BEGIN IMMEDIATE")
        found = _version(conn, path, version)
        scripts = [ddl] if found == 0 else [(migrations or {})[v] for v in range(found, version)]
        for script in scripts:
            for statement in filter(None, (s.strip() for s in script.split(";"))):
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {version}")
        conn.execute("COMMIT")
        conn.isolation_level = ""
        return conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()
        raise


def read_frame(path: Path, version: int, query: str, params: tuple = ()) -> pd.DataFrame | None:
    """Rows of a query over a store opened read-only; None when the store does not exist or
    was never initialised.

    A writer killed mid-transaction (the server SIGKILLed while it stored feedback) leaves a hot
    journal that a read-only connection may not roll back (SQLITE_READONLY_ROLLBACK). Then one
    read-write connection opens the store, which rolls the unfinished transaction back exactly
    as the next writer would, and the read is done again read-only: no acknowledged row is lost
    (they were committed) and the half-written one is not read.
    """
    if not path.exists():
        return None
    try:
        return _read_only(path, version, query, params)
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorname", "") not in _LEFT_BY_A_DEAD_WRITER:
            raise
    recover = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS)
    try:
        _version(recover, path, version)  # the first read rolls back (or rebuilds the WAL index)
    finally:
        recover.close()
    return _read_only(path, version, query, params)


def _read_only(path: Path, version: int, query: str, params: tuple) -> pd.DataFrame | None:
    conn = sqlite3.connect(
        f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_SECONDS
    )
    try:
        if _version(conn, path, version) == 0:
            return None
        return pd.read_sql_query(query, conn, params=params)
    finally:
        conn.close()
