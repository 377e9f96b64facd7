"""The run lock: a file lock that dies with its process, plus a global concurrency limit of one on
a Prefect server; a run asked not to wait stops at once, naming the run that holds it."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.variables import Variable
from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.flows.limits import ensure_limit, run_limit, run_lock
from flywheel.flows.pipeline import pipeline
from flywheel.locks import LockBusy
from tests.conftest import holding

MODEL = "flywheel-classifier"


def test_on_a_server_a_run_waits_for_another_machines_run(tmp_path):
    """The server's limit is held by a run elsewhere (here: a plain slot); this run's file lock is
    free, yet it waits for the limit, or, asked not to wait, stops."""
    name = run_limit(MODEL)
    ensure_limit(name, 1)
    with concurrency(name, occupy=1, strict=True):
        with (
            pytest.raises(LockBusy, match=f"holds the Prefect server's concurrency limit {name}"),
            run_lock(tmp_path, MODEL, "second", wait=False, server=True),
        ):
            pytest.fail("took the server's slot another run holds")
        started = time.monotonic()
        with (
            pytest.raises(TimeoutError),
            run_lock(tmp_path, MODEL, "second", timeout_seconds=2, server=True),
        ):
            pytest.fail("took the server's slot another run holds")
        assert time.monotonic() - started >= 2
    with run_lock(tmp_path, MODEL, "second", timeout_seconds=30, server=True):  # free again
        pass
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).limit == 1


def test_the_server_names_the_holder_to_other_machines(tmp_path):
    """Two project folders stand for two machines: their file locks are apart, the server's limit
    is shared, and its variable names the run that holds it."""
    name = run_limit(MODEL)
    ensure_limit(name, 3)  # set back to one by the next run
    taken, done = threading.Event(), threading.Event()

    def first_machine() -> None:
        with run_lock(tmp_path / "a", MODEL, "flow run 'first-run' (1234)", server=True):
            taken.set()
            done.wait(timeout=60)

    thread = threading.Thread(target=first_machine)
    thread.start()
    try:
        assert taken.wait(timeout=60)
        assert Variable.get(name)["what"] == "flow run 'first-run' (1234)"
        with (
            pytest.raises(LockBusy, match="flow run 'first-run' \\(1234\\), pid \\d+ on "),
            run_lock(tmp_path / "b", MODEL, "second", wait=False, server=True),
        ):
            pytest.fail("took the server's slot another machine holds")
    finally:
        done.set()
        thread.join(timeout=60)
    assert Variable.get(name, default=None) is None  # released: the variable names nobody
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).limit == 1


HOLDER = """
import sys, time
from pathlib import Path
from flywheel.flows.limits import run_lock
what = "flow run 'first-run' (1234)"
with run_lock(Path(sys.argv[1]), "flywheel-classifier", what, server=False):
    print("holding", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(project):
    """Another process holds the project's run lock (as a running pipeline would)."""
    with holding(HOLDER, str(project)) as proc:
        yield project, proc


def test_locally_a_killed_run_does_not_keep_the_lock(holder):
    """While one process holds the run lock no other run on the machine starts, with or without
    a Prefect server; killed (SIGKILL), it holds nothing."""
    root, proc = holder
    for server in (False, True):  # a run using a Prefect server waits for a local one too
        with (
            pytest.raises(TimeoutError),
            run_lock(root, MODEL, "second", timeout_seconds=2, server=server),
        ):
            pytest.fail("took the lock another process holds")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    started = time.monotonic()
    with run_lock(root, MODEL, "second", timeout_seconds=10, server=False):
        assert time.monotonic() - started < 5
    assert (root / ".flywheel" / "run.lock").is_file()


def test_a_flow_asked_not_to_wait_fails_at_once_naming_the_holder(holder):
    root, proc = holder
    started = time.monotonic()
    with pytest.raises(LockBusy, match=f"flow run 'first-run' \\(1234\\), pid {proc.pid} on "):
        pipeline(params_path=root / "params.yaml", data_only=True, wait=False)
    assert time.monotonic() - started < 30
    assert not (root / "data" / "raw").exists()  # not one stage ran


def test_run_no_wait_exits_2_with_the_holder_before_starting_prefect(holder):
    root, proc = holder
    result = CliRunner().invoke(
        app, ["run", "--params", str(root / "params.yaml"), "--data-only", "--no-wait"]
    )
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: pipeline runs of {root} run one at a time, and ")
    assert f"flow run 'first-run' (1234), pid {proc.pid} on " in result.output
    assert "asked not to wait" in result.output
    assert not (root / "data" / "raw").exists()
