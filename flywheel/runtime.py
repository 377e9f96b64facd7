"""Process-wide settings, applied once by the CLI (never at import): offline flags, logging.

Later stages add seeds, device choice and thread counts here, so they are set in one place.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flywheel.errors import FlywheelError

# Defaults only: a value already in the environment wins (e.g. PREFECT_API_URL for a server).
OFFLINE_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "flywheel",
    "PREFECT_UI_ENABLED": "false",
}

QUIET_LOGGERS = ("httpx", "great_expectations", "filelock")


class NoTracebackForExpectedErrors(logging.Filter):
    """Prefect logs task failures with a traceback; for a FlywheelError the message says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], FlywheelError):
            record.exc_info = None
            record.exc_text = None
        return True


def configure(root: Path) -> None:
    """Set offline defaults and a project-local Prefect home (so the UI sees `flywheel run`s)."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str((root / ".prefect").resolve()))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(NoTracebackForExpectedErrors())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
