"""Process-wide settings, applied once (never at import): offline flags and logging, and the
seed, device, precision and thread choices for training, so they are set in one place.

Logging: INFO and up to the console (stderr) and to the log file `.flywheel/logs/flywheel.log`;
Python warnings are logged too. Library notes that mean nothing to a user (see `NOISE`) stay
off the console and go to the file only.
"""

from __future__ import annotations

import importlib.abc
import logging
import logging.handlers
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

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
    # A new project's first ephemeral Prefect server migrates its database: over the default 20 s
    # when two runs start at once on 2 busy cores (a CI failure: "Failed to connect to
    # ephemeral Prefect API server" at 21 s).
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
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


# --- logging: the console, the log file, and what stays off the console ----------------------

LOG_FILE = Path(".flywheel/logs/flywheel.log")  # under the project root; rotated at 5 MB, 3 kept
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FILE_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"  # with the date

# Library notes that mean nothing to a user: matched against the whole message (for a Python
# warning: "path/to/module.py:LINE: Category: text"). Off the console, still in the log file.
NOISE = tuple(
    re.compile(pattern, re.IGNORECASE | re.DOTALL)
    for pattern in (
        r"torchvision is not installed",  # torch.onnx's exporter skipping torchvision ops
        r"requires torchvision \(not installed\)",  # transformers
        r"Failed to load image Python extension",  # torchvision built for another torch
        # deprecations raised inside the ML stack, not in anything a user wrote: in its files,
        # or in the standard library's on its behalf (torch's "`isinstance(treespec, LeafSpec)`
        # is deprecated" comes from copyreg.py)
        r"(?:[/\\](?:torch|transformers|onnx|onnxscript|onnx_ir|onnxruntime)[/\\][^\n]*"
        r"|[/\\]lib[/\\]python3\.\d+[/\\](?!site-packages[/\\])[^\n:]*|<frozen [^>]+>)"
        r":\d+: (?:Future|Deprecation)Warning: ",
        r"[/\\]mlflow[/\\][^\n]*:\d+: \w+: [^\n]*type hint",  # "Add type hints to `predict`"
        r"pkg_resources is deprecated",
    )
)
LIBRARIES = ("torch", "transformers", "mlflow")  # they log to stderr with handlers of their own


class ConsoleNoise(logging.Filter):
    """Keeps the `NOISE` messages off the handler it is attached to (the console)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let the handler report it
            return True
        if record.name.startswith("mlflow") and "type hint" in message.lower():
            return False
        return not any(pattern.search(message) for pattern in NOISE)


ANSI = re.compile(r"\x1b\[[0-9;]*m")


class TidyWarning(logging.Filter):
    """A Python warning as one tidy message: no colour codes, no trailing blank line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = ANSI.sub("", record.getMessage()).rstrip(), ()
        return True


class ConsoleHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is at each line, so lines logged while a progress bar is
    drawn land above it (the bar redirects stderr meanwhile); or to a fixed `stream`."""

    def __init__(self, stream: TextIO | None = None):
        super().__init__(stream or sys.stderr)
        self.fixed = stream is not None

    def emit(self, record: logging.LogRecord) -> None:
        if not self.fixed:
            self.stream = sys.stderr
        super().emit(record)


def log_handlers(log_file: Path | None, stream: TextIO | None = None) -> list[logging.Handler]:
    """The console handler (noise filtered out) and, if `log_file` can be written, the file
    handler (everything, with dates)."""
    console = ConsoleHandler(stream)
    console.set_name("flywheel.console")
    console.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    console.addFilter(ConsoleNoise())
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            return handlers  # a read-only project: the console only
        file = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=5_000_000, backupCount=3, encoding="utf-8", delay=True
        )
        file.set_name("flywheel.file")
        file.setFormatter(logging.Formatter(FILE_FORMAT))
        handlers.append(file)
    return handlers


def configure_logging(log_file: Path | None, stream: TextIO | None = None) -> None:
    """INFO and up to the console and `log_file`, Python warnings among them; library loggers
    that print on their own (`LIBRARIES`) handed to these handlers once imported. Only if this
    process's logging is not set up by someone else (pytest, an application embedding flywheel):
    then theirs stays. A second call points the file handler at the new `log_file`."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if (h.get_name() or "").startswith("flywheel.")]
    if root.handlers and not ours:
        for handler in root.handlers:
            if not any(isinstance(f, NoTracebackForExpectedErrors) for f in handler.filters):
                handler.addFilter(NoTracebackForExpectedErrors())
        return
    for handler in ours:  # a second call: new handlers (the project may differ)
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)
    for handler in log_handlers(log_file, stream):
        handler.addFilter(NoTracebackForExpectedErrors())
        root.addHandler(handler)
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    if not any(isinstance(f, TidyWarning) for f in warnings_logger.filters):
        warnings_logger.addFilter(TidyWarning())
    route_library_logs()
    if not any(isinstance(finder, RouteOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, RouteOnImport())


def route_library_logs(libraries: Sequence[str] = LIBRARIES) -> None:
    """Hand the loggers of `libraries` back to the root logger: drop the stderr handlers they
    gave themselves and let their records propagate (levels stay as the library set them)."""
    for name in list(logging.Logger.manager.loggerDict):
        if name.split(".")[0] not in libraries:
            continue
        logger = logging.getLogger(name)
        if logger.propagate:
            continue
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # exactly theirs: not a file handler
                logger.removeHandler(handler)
        logger.propagate = True


class RouteOnImport(importlib.abc.MetaPathFinder):
    """Runs `route_library_logs` right after one of `libraries` is imported (they set up their
    handlers on import; torch and the rest are imported only by the commands that need them)."""

    def __init__(self, libraries: Sequence[str] = LIBRARIES):
        self.libraries = tuple(libraries)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in self.libraries:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_route(module: ModuleType) -> None:
            exec_module(module)
            route_library_logs((fullname,))

        loader.exec_module = exec_and_route  # type: ignore[method-assign]
        return spec


def configure(root: Path) -> None:
    """Set offline defaults and a project-local Prefect home (so the UI sees `flywheel run`s),
    and logging (console and `root / LOG_FILE`)."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str((root / ".prefect").resolve()))
    configure_logging(root / LOG_FILE)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


# --- seeds, device, precision, threads: set here and nowhere else -----------------------------


@dataclass(frozen=True)
class Device:
    """Where training runs and in which precision."""

    type: str  # "cuda", "mps" or "cpu"
    autocast_dtype: str | None  # "bfloat16" (CUDA, or a CPU with native bf16) / "float16"
    # (CUDA) under autocast; None = fp32
    grad_scaler: bool  # fp16 needs loss scaling; bf16 and fp32 do not

    def __str__(self) -> str:
        return f"{self.type} ({self.autocast_dtype or 'float32'})"


def cpu_bf16_supported() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX tiles), as oneDNN, which
    runs torch's CPU autocast, sees it. Without it bf16 is emulated, and slower than fp32."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def select_device(
    preference: str = "auto",
    precision: str = "auto",
    *,
    cuda_available: bool | None = None,
    mps_available: bool | None = None,
    bf16_supported: bool | None = None,
    cpu_bf16: bool | None = None,
) -> Device:
    """CUDA > MPS > CPU unless `preference` names one, and the precision to train in.

    The availability flags default to asking torch; tests inject them to cover GPU machines and
    CPUs without bf16. `precision`: "auto" (CUDA: bf16 where supported, else fp16 with a grad
    scaler; CPU: bf16 autocast where the CPU has native bf16, `cpu_bf16`, else fp32 — measured
    in docs/decisions/0016-bf16-and-length-grouped-training-on-cpu.md), "bf16", "fp16" (CUDA
    only; fp32 elsewhere), "fp32". MPS trains in fp32.
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
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"unknown precision {precision!r} (auto, bf16, fp16, fp32)")
    if kind == "cpu" and precision in ("auto", "bf16"):
        native = cpu_bf16_supported() if cpu_bf16 is None else cpu_bf16
        if native:
            return Device("cpu", "bfloat16", False)
        if precision == "bf16":
            raise ConfigError(
                "train.precision is bf16 but this CPU has no native bfloat16 (AVX-512 BF16 or "
                "AMX): emulated, it trains slower than fp32 (use auto or fp32)"
            )
    if kind != "cuda" or precision == "fp32":
        return Device(kind, None, False)
    if precision == "bf16" or (precision == "auto" and bf16_supported):
        if not bf16_supported:
            raise ConfigError(
                "train.precision is bf16 but this GPU does not support bfloat16 (use auto or fp16)"
            )
        return Device(kind, "bfloat16", False)
    return Device(kind, "float16", True)


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
