"""Retry policy for Prefect tasks: retry I/O failures, never bad data or bad config."""

from __future__ import annotations

from typing import Any


def retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only when the failure was an OSError (disk, network)."""
    try:
        state.result()
    except OSError:
        return True
    except Exception:
        return False
    return False
