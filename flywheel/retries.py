"""Retry policy for Prefect tasks: retry I/O failures, never bad data or bad config."""

from __future__ import annotations

import sqlite3
from typing import Any

# OSError covers disks, sockets and failed subprocesses; OperationalError is SQLite's
# "database is locked" (the feedback store while serving writes to it).
IO_ERRORS = (OSError, sqlite3.OperationalError)


def retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only when the failure was an I/O error."""
    try:
        state.result()
    except IO_ERRORS:
        return True
    except Exception:
        return False
    return False
