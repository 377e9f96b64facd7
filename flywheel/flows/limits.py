"""Training runs one at a time: the training slot, taken by the train task's body (so only a
training that really runs takes it: a cached one never executes the body). Retrains (the
retrain flow: check, then pipeline) run one at a time too: the retrain slot, which a second
retrain does not wait for (it records "another retrain is running" and stops).

Scheduled runs, a feedback-triggered run and a hand-started one may overlap; their data and
report stages can, but two trainings on one machine would each take twice as long and fight
for memory. Two locks, always in this order:

- an exclusive `flock` on `.flywheel/training.lock`: every run on this machine, with or without
  a Prefect server, and released by the kernel when its process dies (a killed run holds
  nothing);
- with a Prefect server (PREFECT_API_URL: `flywheel ui`, `flywheel schedule`, a team server)
  also the global concurrency limit `flywheel-training` (limit 1) on that server, which holds
  across machines. The servers Flywheel starts keep their slot leases on disk
  (flywheel/servers.py), so a lease of a killed run expires even across a server restart.
  A temporary local server keeps leases in memory and never expires them, so local mode uses
  the file lock alone.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

TRAINING = "flywheel-training"
POLL_SECONDS = 1.0


def ensure_limit(name: str, limit: int) -> None:
    """Create the global concurrency limit `name` with `limit` slots, or set it to `limit`."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(name, limit)
        except ObjectAlreadyExists:  # another run created it between our read and create
            client.upsert_global_concurrency_limit_by_name(name, limit)


def has_server() -> bool:
    """Whether Prefect talks to a server that outlives this process (else: a temporary one)."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def try_lock(handle: IO[str]) -> bool:
    """Take an exclusive flock on the open file without waiting; whether it was free."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextmanager
def file_slot(path: Path, timeout_seconds: float | None = None) -> Iterator[None]:
    """An exclusive flock on `path` for the block; TimeoutError after `timeout_seconds`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    with path.open("a") as handle:
        while not try_lock(handle):
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{path} is held by another training")
            time.sleep(POLL_SECONDS)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def training_slot(
    root: Path, timeout_seconds: float | None = None, server: bool | None = None
) -> Iterator[None]:
    """Hold the one training slot while the block runs, waiting for another run's training to
    finish. `server` defaults to `has_server()` (tests inject it)."""
    log.info("train: taking the training slot (waits while another run trains)")
    with file_slot(root / ".flywheel" / "training.lock", timeout_seconds):
        if not (has_server() if server is None else server):
            yield
            return
        from prefect.concurrency.sync import concurrency

        ensure_limit(TRAINING, 1)
        with concurrency(TRAINING, occupy=1, timeout_seconds=timeout_seconds, strict=True):
            yield


@contextmanager
def retrain_slot(root: Path) -> Iterator[bool]:
    """Try to take the retrain slot (an exclusive flock on `.flywheel/retrain.lock`, released
    when this process dies) without waiting; yields whether this process holds it."""
    path = root / ".flywheel" / "retrain.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        if not try_lock(handle):
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
