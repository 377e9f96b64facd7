"""Project locks: an exclusive `flock` on a file in `.flywheel/`, released by the kernel when its
process dies, with the holder written into the file (`hold`, `Holder`, `LockBusy`).

`run.lock`: a whole pipeline run (flows/limits.py `run_lock`); `registry.lock`: an alias move
(`registry_lock`); `retrain.lock`: a retrain (flows/limits.py `retrain_slot`). Not re-entrant:
waiting for a lock the same thread holds is an error. Why: docs/decisions/0011-one-run-at-a-time.md.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from flywheel.errors import FlywheelError

log = logging.getLogger(__name__)

LOCK_DIR = ".flywheel"
POLL_SECONDS = 1.0
_held = threading.local()  # per thread: the lock paths it holds


class LockBusy(FlywheelError):
    """Another process holds the lock and the caller asked not to wait."""

    def __init__(self, message: str, holder: Holder | None):
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as written into the lock file."""

    what: str  # e.g. "flow run dapper-fox (3f2a...)" or "flywheel models promote"
    pid: int
    host: str
    command: str
    started: str  # ISO time, UTC

    @classmethod
    def me(cls, what: str) -> Holder:
        return cls(
            what,
            os.getpid(),
            socket.gethostname(),
            " ".join(sys.argv)[:200],
            datetime.now(UTC).isoformat(timespec="seconds"),
        )

    @classmethod
    def of(cls, record: object) -> Holder | None:
        """The holder a record (a dict of the fields) names, or None if it names none."""
        try:
            holder = cls(**record) if isinstance(record, dict) else None
            if holder is not None:
                datetime.fromisoformat(holder.started)
        except (TypeError, ValueError):
            return None
        return holder

    def describe(self) -> str:
        started = datetime.fromisoformat(self.started)
        seconds = (datetime.now(UTC) - started).total_seconds()
        ago = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
        return (
            f"{self.what}, pid {self.pid} on {self.host} ({self.command}), started "
            f"{started:%Y-%m-%d %H:%M:%S} UTC, {ago} ago"
        )


def read_holder(path: Path) -> Holder | None:
    """The holder written into a lock file, or None (free, being written, or unreadable)."""
    try:
        return Holder.of(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def try_lock(handle: IO[str]) -> bool:
    """Take an exclusive flock on the open file without waiting; whether it was free."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _who(holder: Holder | None) -> str:
    return holder.describe() if holder else "a process that is just starting"


def _busy(path: Path, guards: str) -> LockBusy:
    holder = read_holder(path)
    return LockBusy(
        f"{guards} run one at a time, and {_who(holder)} holds {path}; asked not to wait, so "
        "this one stops: start it again when that one has finished, or let it wait",
        holder,
    )


def ensure_free(path: Path, guards: str) -> None:
    """Raise LockBusy naming the holder if the lock at `path` is held right now (a snapshot, to
    fail fast before starting anything: `hold` is what takes it)."""
    if not path.is_file():
        return
    with path.open("a") as handle:
        if not try_lock(handle):
            raise _busy(path, guards)
        fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def hold(
    path: Path,
    what: str,
    *,
    guards: str,
    wait: bool = True,
    timeout_seconds: float | None = None,
) -> Iterator[None]:
    """Hold the exclusive lock at `path` for the block, as `what` (written into the file).

    Taken: wait for the holder, logging who it is (again if another one takes it first), or with
    `wait=False` raise LockBusy naming it; TimeoutError after `timeout_seconds`. `guards` says
    what the lock serialises, for those messages ("pipeline runs of /project").
    """
    held: set[str] = _held.__dict__.setdefault("paths", set())
    key = str(path.resolve())
    if wait and key in held:  # a flock is not re-entrant: this thread would wait for itself
        raise RuntimeError(f"{path} is already held by this thread; take it once, outside")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        waiting_since, named = None, None
        while not try_lock(handle):
            if not wait:
                raise _busy(path, guards)
            holder, now = read_holder(path), time.monotonic()
            if waiting_since is None or (holder is not None and holder != named):
                log.warning(
                    "%s run one at a time: waiting for the one holding %s to finish: %s",
                    guards,
                    path,
                    _who(holder),
                )
                named = holder
            waiting_since = waiting_since or now
            if timeout_seconds is not None and now - waiting_since >= timeout_seconds:
                raise TimeoutError(f"{path} still held after {timeout_seconds:.0f} s")
            time.sleep(POLL_SECONDS)
        if waiting_since is not None:
            log.info("took %s after waiting %.0f s", path, time.monotonic() - waiting_since)
        # Append mode: after the truncation the record is written at the start of the file.
        handle.truncate(0)
        handle.write(json.dumps(asdict(Holder.me(what))))
        handle.flush()
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            handle.truncate(0)  # a free lock names nobody
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def registry_lock(root: Path, actor: str, wait: bool = True) -> Iterator[None]:
    """Hold the project's registry lock (`.flywheel/registry.lock`) while deciding and moving
    aliases, as `actor` (e.g. "flywheel models promote"); waits for another move by default."""
    with hold(root / LOCK_DIR / "registry.lock", actor, guards=f"alias moves in {root}", wait=wait):
        yield
