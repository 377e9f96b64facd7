"""The training slot: a global concurrency limit of one on a Prefect server, a file lock that
dies with its process in local mode."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency

from flywheel.flows.limits import TRAINING, ensure_limit, training_slot


def test_on_a_server_a_second_training_waits_for_the_first(tmp_path):
    ensure_limit(TRAINING, 1)
    with concurrency(TRAINING, occupy=1, strict=True):  # another run is training
        started = time.monotonic()
        with pytest.raises(TimeoutError), training_slot(tmp_path, timeout_seconds=2, server=True):
            pytest.fail("took a second training slot")
        assert time.monotonic() - started >= 2
    with training_slot(tmp_path, timeout_seconds=30, server=True):  # released: free again
        pass
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(TRAINING).limit == 1


def test_the_limit_is_set_back_to_one(tmp_path):
    ensure_limit(TRAINING, 3)
    with training_slot(tmp_path, timeout_seconds=30, server=True):
        pass
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(TRAINING).limit == 1


HOLDER = """
import sys, time
from pathlib import Path
from flywheel.flows.limits import training_slot
with training_slot(Path(sys.argv[1]), server=False):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_locally_a_killed_training_does_not_keep_the_slot(tmp_path):
    """A run killed (SIGKILL) while training must not block the re-run; and while it trains,
    no other run on the machine trains, with or without a Prefect server."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        for server in (False, True):  # a run using a Prefect server waits for a local one too
            with (
                pytest.raises(TimeoutError),
                training_slot(tmp_path, timeout_seconds=2, server=server),
            ):
                pytest.fail("took the slot another process holds")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    started = time.monotonic()
    with training_slot(tmp_path, timeout_seconds=10, server=False):
        assert time.monotonic() - started < 5
    assert (tmp_path / ".flywheel" / "training.lock").is_file()
