"""Project locks: one holder at a time, named in the lock file; a killed holder holds nothing."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from flywheel.locks import LockBusy, ensure_free, hold, read_holder, registry_lock
from tests.conftest import holding

HOLDER = """
import sys, time
from pathlib import Path
from flywheel.locks import hold
with hold(Path(sys.argv[1]), "flow run 'first-run' (1234)", guards="pipeline runs of here"):
    print("holding", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def held(tmp_path):
    """A lock file held by another process until the test ends; yields (path, process)."""
    path = tmp_path / ".flywheel" / "run.lock"
    with holding(HOLDER, str(path)) as proc:
        yield path, proc


def test_asked_not_to_wait_it_stops_naming_the_holder(held):
    path, proc = held
    for attempt in (
        lambda: hold(path, "second", guards="pipeline runs of here", wait=False).__enter__(),
        lambda: ensure_free(path, "pipeline runs of here"),
    ):
        with pytest.raises(LockBusy) as busy:
            attempt()
        message = str(busy.value)
        assert message.startswith("pipeline runs of here run one at a time, and flow run")
        assert f"'first-run' (1234), pid {proc.pid} on " in message
        assert "started 20" in message and "asked not to wait" in message
        assert busy.value.holder.pid == proc.pid
    assert read_holder(path).what == "flow run 'first-run' (1234)"  # the holder's record kept


def test_a_waiting_process_says_whom_it_waits_for(held, caplog):
    path, proc = held
    caplog.set_level(logging.INFO, logger="flywheel.locks")
    started = time.monotonic()
    with pytest.raises(TimeoutError), hold(path, "second", guards="runs", timeout_seconds=1.5):
        pytest.fail("took a lock another process holds")
    assert time.monotonic() - started >= 1.5
    waiting = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert len(waiting) == 1  # once, not at every poll
    assert waiting[0].startswith(
        f"runs run one at a time: waiting for the one holding {path} to finish: "
        f"flow run 'first-run' (1234), pid {proc.pid} on "
    )


def test_a_killed_holder_holds_nothing_and_a_free_lock_names_nobody(held, caplog):
    path, proc = held
    caplog.set_level(logging.INFO, logger="flywheel.locks")
    threading.Timer(1.0, proc.send_signal, [signal.SIGKILL]).start()
    started = time.monotonic()
    with hold(path, "second", guards="runs", timeout_seconds=30):
        assert 0.9 < time.monotonic() - started < 10
        assert read_holder(path).what == "second" and read_holder(path).pid == os.getpid()
    assert any("after waiting" in r.getMessage() for r in caplog.records)
    assert read_holder(path) is None
    ensure_free(path, "runs")  # free: no error


def test_a_thread_asking_again_for_its_own_lock_is_an_error_not_a_deadlock(tmp_path):
    path = tmp_path / "run.lock"
    with hold(path, "first", guards="runs"):
        with pytest.raises(RuntimeError, match="already held by this thread"):
            hold(path, "again", guards="runs").__enter__()
        with pytest.raises(LockBusy):  # not waiting: busy, as for any other holder
            hold(path, "again", guards="runs", wait=False).__enter__()
    with hold(path, "later", guards="runs"):  # released whole
        pass


def test_alias_moves_are_serialised_across_threads(tmp_path):
    """Two moves at once: the second starts deciding only after the first has moved."""
    spans: list[tuple[float, float]] = []

    def move(actor: str) -> None:
        with registry_lock(tmp_path, actor):
            start = time.monotonic()
            time.sleep(0.3)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=move, args=(f"mover {i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    (a_start, a_end), (b_start, b_end) = sorted(spans)
    assert a_end <= b_start
    assert (tmp_path / ".flywheel" / "registry.lock").is_file()
    assert read_holder(Path(tmp_path / ".flywheel" / "registry.lock")) is None
