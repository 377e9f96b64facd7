"""Process-wide settings, applied once (never at import): offline flags and logging, and the
seed, device, precision and thread choices for training, so they are set in one place.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from flywheel.config import ConfigError
from flywheel.errors import FlywheelError

# Defaults only: a value already in the environment wins (e.g. PREFECT_API_URL for a server).
OFFLINE_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "flywheel",
    # flywheel's loggers also log outside flows (serve, monitor): no warning for each line
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "PREFECT_UI_ENABLED": "false",
    # transformers' load reports and per-file progress bars; training has its own progress bar.
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # MLflow configures its own loggers on import; its INFO lines are about database migrations.
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    # one bar per downloaded file of a registered model (tens of lines per `flywheel models`)
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}

QUIET_LOGGERS = (
    "httpx",
    "great_expectations",
    "filelock",
    "alembic",
    "onnx_ir",
    "onnxscript",
    "torch.onnx",
)


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


# --- seeds, device, precision, threads: set here and nowhere else -----------------------------


@dataclass(frozen=True)
class Device:
    """Where training runs and in which precision."""

    type: str  # "cuda", "mps" or "cpu"
    autocast_dtype: str | None  # "bfloat16" / "float16" under autocast on CUDA; None = fp32
    grad_scaler: bool  # fp16 needs loss scaling; bf16 and fp32 do not

    def __str__(self) -> str:
        return f"{self.type} ({self.autocast_dtype or 'float32'})"


def select_device(
    preference: str = "auto",
    precision: str = "auto",
    *,
    cuda_available: bool | None = None,
    mps_available: bool | None = None,
    bf16_supported: bool | None = None,
) -> Device:
    """CUDA > MPS > CPU unless `preference` names one; mixed precision only on CUDA.

    The availability flags default to asking torch; tests inject them to cover GPU machines.
    `precision`: "auto" (bf16 where supported, else fp16 with a grad scaler), "bf16", "fp16",
    "fp32".
    """
    if cuda_available is None or mps_available is None or bf16_supported is None:
        import torch

        cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
        if mps_available is None:
            mps_available = torch.backends.mps.is_available()
        if bf16_supported is None:
            bf16_supported = cuda_available and torch.cuda.is_bf16_supported()
    available = {"cuda": cuda_available, "mps": mps_available, "cpu": True}
    if preference == "auto":
        kind = next(name for name in ("cuda", "mps", "cpu") if available[name])
    elif preference in available:
        if not available[preference]:
            raise ConfigError(
                f"train.device is {preference!r} but no {preference} device is available "
                "(use auto, or cpu)"
            )
        kind = preference
    else:
        raise ConfigError(f"unknown device {preference!r} (auto, cuda, mps, cpu)")
    if kind != "cuda" or precision == "fp32":
        return Device(kind, None, False)
    if precision == "bf16" or (precision == "auto" and bf16_supported):
        if not bf16_supported:
            raise ConfigError(
                "train.precision is bf16 but this GPU does not support bfloat16 (use auto or fp16)"
            )
        return Device(kind, "bfloat16", False)
    if precision in ("fp16", "auto"):
        return Device(kind, "float16", True)
    raise ConfigError(f"unknown precision {precision!r} (auto, bf16, fp16, fp32)")


def seed_everything(seed: int) -> None:
    """The one seeding point: Python, NumPy and torch (all devices)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(threads: int | None) -> int:
    """CPU threads for torch, set once per process; None keeps torch's default. Returns it."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
