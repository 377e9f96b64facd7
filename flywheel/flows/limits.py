"""Pipeline runs of one project run one at a time, whatever starts them; so do retrains.

`run_lock`, around the whole pipeline flow: an exclusive flock on `.flywheel/run.lock`
(flywheel/locks.py), then, with a Prefect server (PREFECT_API_URL), its global concurrency limit
`flywheel-run-<registry model>` (limit 1). `retrain_slot`: `.flywheel/retrain.lock`, not waited
for (a second retrain records "another retrain is running" and stops).
Why: docs/decisions/0011-one-run-at-a-time.md (run lock) and 0009 (retrain slot).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path

from flywheel.locks import LOCK_DIR, Holder, LockBusy, hold

log = logging.getLogger(__name__)

RUN_LIMIT_PREFIX = "flywheel-run-"
HTTP_LOCKED = 423


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


def run_limit(model_name: str) -> str:
    """The server's concurrency limit (and holder variable) for runs registering `model_name`."""
    return RUN_LIMIT_PREFIX + re.sub(r"[^A-Za-z0-9_-]", "-", model_name)


def run_lock_path(root: Path) -> Path:
    return root / LOCK_DIR / "run.lock"


def runs_of(root: Path) -> str:
    """What the run lock serialises, for its messages."""
    return f"pipeline runs of {root}"


@contextmanager
def run_lock(
    root: Path,
    model_name: str,
    what: str,
    *,
    wait: bool = True,
    timeout_seconds: float | None = None,
    server: bool | None = None,
) -> Iterator[None]:
    """Hold the project's run lock for the block, as `what` (e.g. the flow run's name and id):
    wait for another run to finish, saying who it is, or with `wait=False` raise LockBusy naming
    it. `server` defaults to `has_server()` (tests inject it)."""
    with hold(
        run_lock_path(root),
        what,
        guards=runs_of(root),
        wait=wait,
        timeout_seconds=timeout_seconds,
    ):
        if not (has_server() if server is None else server):
            yield
            return
        with server_slot(run_limit(model_name), what, wait, timeout_seconds):
            yield


@contextmanager
def server_slot(name: str, what: str, wait: bool, timeout_seconds: float | None) -> Iterator[None]:
    """The one slot of the server's concurrency limit `name`, its holder named in the variable
    `name`. One try first, so a busy slot is reported (or refused) before waiting for it."""
    from prefect.concurrency.sync import concurrency
    from prefect.variables import Variable

    ensure_limit(name, 1)

    def slot(**how) -> object:
        # A lease that cannot be renewed for a while must not kill a long run; the file lock
        # still holds on this machine.
        return concurrency(name, strict=True, raise_on_lease_renewal_failure=False, **how)

    with ExitStack() as stack:
        try:
            stack.enter_context(slot(max_retries=0))
        except Exception as exc:
            if not _locked(exc):
                raise
            holder = Holder.of(Variable.get(name, default=None))
            message = (
                "runs registering into the same model run one at a time, and "
                f"{holder.describe() if holder else 'another run'} holds the Prefect server's "
                f"concurrency limit {name}"
            )
            if not wait:
                raise LockBusy(f"{message}; asked not to wait, so this one stops", holder) from None
            log.warning("%s: waiting for it to finish", message)
            stack.enter_context(slot(timeout_seconds=timeout_seconds))
        _best_effort(lambda: Variable.set(name, asdict(Holder.me(what)), overwrite=True))
        try:
            yield
        finally:
            _best_effort(lambda: Variable.unset(name))


def _best_effort(step: Callable[[], object]) -> None:
    """Record or clear who holds the server slot: only to name the holder to a waiting run, so
    a failure must neither stop this run nor hide the exception it is ending with."""
    try:
        step()
    except Exception as exc:
        log.warning("run lock: could not record the holder on the Prefect server: %s", exc)


def _locked(exc: BaseException) -> bool:
    """Whether the server refused a slot because the limit is full (HTTP 423 Locked)."""
    cause = exc.__cause__
    response = getattr(cause, "response", None)
    return getattr(response, "status_code", None) == HTTP_LOCKED


@contextmanager
def retrain_slot(root: Path) -> Iterator[bool]:
    """Try to take the retrain slot (an exclusive flock on `.flywheel/retrain.lock`, released
    when this process dies) without waiting; yields whether this process holds it."""
    with ExitStack() as stack:
        try:
            stack.enter_context(
                hold(root / LOCK_DIR / "retrain.lock", "a retrain", guards="retrains", wait=False)
            )
        except LockBusy:
            yield False
            return
        yield True
