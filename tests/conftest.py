"""Shared fixtures: small labelled frames and a throw-away Flywheel project (git + DVC)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

# A test run started in the background without job control (`nohup make test &`) inherits
# SIGINT ignored, and so would every process the tests start: the Ctrl-C tests (`flywheel ui`,
# `flywheel schedule`) could not stop theirs. Tests start from Python's default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def labelled_frame(n_per_class: int = 30, labels: tuple[str, ...] = ("pos", "neg")) -> pd.DataFrame:
    """Distinct, valid texts: n_per_class rows for each label, with file-style origins."""
    rows = [
        {"text": f"review number {i} about film {label} {i * 7 % 13}", "label": label}
        for label in labels
        for i in range(n_per_class)
    ]
    frame = pd.DataFrame(rows).astype("string")
    frame["origin"] = [f"sample.csv:{i}" for i in range(1, len(frame) + 1)]
    return frame


@contextmanager
def holding(code: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """Another process that runs `code` (which takes a lock, prints "holding" and sleeps) with
    `args`; SIGKILLed at the end, as a crashed holder would be."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "holding"
        yield proc
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


def make_project(root: Path, remote: Path) -> Path:
    """A Flywheel project in a new git + DVC repo at `root`, with a local DVC remote at `remote`.

    The dvc.yaml stage commands call .venv/bin/flywheel: .venv points at this interpreter's env.
    """
    root.mkdir(parents=True)
    shutil.copytree(
        REPO / "flywheel", root / "flywheel", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("params.yaml", "dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy2(REPO / name, root / name)
    for folder in ("data/sources", "data/feedback"):
        (root / folder).mkdir(parents=True)
        (root / folder / ".gitkeep").touch()
    (root / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    run(["git", "init", "-q"], root)
    dvc = str(Path(sys.prefix) / "bin" / "dvc")
    run([dvc, "init", "-q"], root)
    run([dvc, "config", "core.analytics", "false"], root)
    run([dvc, "remote", "add", "-d", "local", str(remote)], root)
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A throw-away Flywheel project (git + DVC) with a DVC remote beside it."""
    return make_project(tmp_path / "project", tmp_path / "remote")


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One temporary Prefect server and database for every test that needs one, for the whole
    session. Never two nested: a run inside a second harness took its run-lock slot (a global
    concurrency limit) on one server and gave it back to the other, and a temporary server
    never reclaims an expired slot, so every later run in the session waited for it forever."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
