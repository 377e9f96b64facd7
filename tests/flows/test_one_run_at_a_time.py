"""Two `flywheel run`s started at once on one project run one after the other, data stages through
promotion, and leave the data version, the registry and the audit log consistent."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flywheel.registry import CHAMPION, ModelRegistry
from flywheel.tasks.version import dir_md5
from tests.flows.conftest import small_project
from tests.flows.test_pipeline import dvc, locked_version

FLYWHEEL = str(Path(sys.prefix) / "bin" / "flywheel")
BLOCKER = """
import sys, time
from pathlib import Path
from flywheel.flows.limits import run_lock
with run_lock(Path(sys.argv[1]), "flywheel-classifier", "the blocker", server=False):
    print("holding", flush=True)
    time.sleep(600)
"""


@dataclass
class Run:
    """A `flywheel run` process and its output, each line stamped when it arrived."""

    proc: subprocess.Popen
    lines: list[tuple[float, str]] = field(default_factory=list)

    def read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def stamps(self, pattern: str) -> list[float]:
        return [stamp for stamp, line in self.lines if re.search(pattern, line)]

    @property
    def flow_run(self) -> str:
        return re.search(r"Beginning flow run '([^']+)'", self.output).group(1)

    @property
    def tasks(self) -> tuple[float, float]:
        """When its first and last task finished: the part of the run that holds the lock."""
        finished = self.stamps(r"prefect\.task_runs: Finished in state")
        return finished[0], finished[-1]


def start(root: Path, *args: str) -> Run:
    drop = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME")
    env = {k: v for k, v in os.environ.items() if k not in drop} | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [FLYWHEEL, "run", "--params", str(root / "params.yaml"), *args],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a failed test stops its Prefect too
    )
    run = Run(proc)
    threading.Thread(target=run.read, daemon=True).start()
    return run


def two_runs_at_once(root: Path, args: list[list[str]], timeout: float) -> tuple[Run, Run]:
    """Start two runs (with these arguments) at once while a third process holds the run lock,
    so both are inside their flows, waiting, when it lets go; return them in the order they took
    the lock."""
    blocker = subprocess.Popen(
        [sys.executable, "-c", BLOCKER, str(root)], stdout=subprocess.PIPE, text=True
    )
    assert blocker.stdout.readline().strip() == "holding"
    runs = [start(root, *run_args) for run_args in args]
    try:
        deadline = time.monotonic() + 120
        while not all(run_lock_waits(root, run) for run in runs):
            assert time.monotonic() < deadline, [run.output for run in runs]
            assert all(run.proc.poll() is None for run in runs), [run.output for run in runs]
            time.sleep(0.5)
        blocker.send_signal(signal.SIGKILL)
        for run in runs:
            run.proc.wait(timeout=timeout)
            time.sleep(0.5)  # the reader has the last lines
            assert run.proc.returncode == 0, run.output[-5000:]
    finally:
        blocker.kill()
        blocker.wait(timeout=30)
        for run in runs:
            if run.proc.poll() is None:
                os.killpg(run.proc.pid, signal.SIGKILL)
                run.proc.wait(timeout=30)
    first, second = sorted(runs, key=lambda run: run.stamps(r"took \S*run\.lock after waiting")[0])
    return first, second


def run_lock_waits(root: Path, run: Run) -> list[str]:
    """The lines in which the run said it waits for the run lock (not for the Prefect server's
    start lock, which both runs may also wait for when they start servers on one new home)."""
    return [
        line
        for _, line in run.lines
        if f"pipeline runs of {root} run one at a time: waiting for the one holding" in line
    ]


def assert_one_after_the_other(root: Path, first: Run, second: Run) -> None:
    """Both waited for the blocker; the second then waited for the first, naming it (flow run,
    pid, command), and ran its stages only after the first had finished all of its own."""
    for run in (first, second):
        waits = run_lock_waits(root, run)
        assert "to finish: the blocker, pid " in waits[0]
    (named,) = [line for line in run_lock_waits(root, second) if "the blocker" not in line]
    assert f"pipeline runs of {root} run one at a time" in named
    assert f"flow run {first.flow_run} (" in named
    assert f"pid {first.proc.pid} on " in named and f"{FLYWHEEL} run --params" in named
    assert first.tasks[1] <= second.tasks[0], "the runs overlapped"


def assert_data_consistent(root: Path, *runs: Run) -> None:
    """The data version each run reported is the one dvc.lock records and data/prepared holds,
    DVC sees nothing to do, and no staging or half-swapped folder is left anywhere."""
    versions = {re.search(r"data version +(\w+\.dir)", run.output).group(1) for run in runs}
    assert versions == {locked_version(root)} == {dir_md5(root / "data" / "prepared")}
    assert "up to date" in dvc(root, "status")
    leftovers = [p for p in root.rglob(".*") if re.search(r"\.(staging|old)-", p.name)]
    assert leftovers == []


def test_two_data_runs_at_once_run_one_after_the_other(tmp_path):
    root = small_project(tmp_path / "project", tmp_path / "remote")
    first, second = two_runs_at_once(root, [["--data-only"]] * 2, timeout=180)
    assert_one_after_the_other(root, first, second)
    assert_data_consistent(root, first, second)
    assert "cache  reused: validate, prepare" in second.output  # the first made them


@pytest.mark.long
def test_two_full_runs_at_once_leave_registry_and_audit_log_consistent(tmp_path):
    """Two whole runs through promotion: one after the other, each registers its version with its
    tags, and the aliases and audit log tell one story. (Both re-register: the second reuses the
    first's training and export, made whole before it began, and registers them again.)"""
    root = small_project(tmp_path / "project", tmp_path / "remote")
    args = ["--set", "train.max_train_rows=96", "--force-from", "register"]
    first, second = two_runs_at_once(root, [args] * 2, timeout=600)
    assert_one_after_the_other(root, first, second)
    assert_data_consistent(root, first, second)
    cache = [line for _, line in second.lines if line.lstrip().startswith("cache ")]
    assert cache == [
        "       cache  reused: validate, prepare, baseline, train, evaluate, export; "
        "ran: register, promote"
    ], cache

    registry = ModelRegistry(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}", "flywheel-classifier")
    versions = {v.version: v for v in registry.versions()}
    assert sorted(versions) == ["1", "2"]
    for version in versions.values():
        assert version.tags["flywheel.data_version"] == locked_version(root)
        assert version.tags["flywheel.test.macro_f1"]
    first_id = re.search(rf"flow run {first.flow_run} \(([0-9a-f-]+)\)", second.output).group(1)
    assert versions["1"].tags["flywheel.flow_run_id"] == first_id  # named by the waiting run
    assert versions["2"].tags["flywheel.flow_run_id"] not in (first_id, "none")
    aliases = registry.aliases()
    assert set(aliases.values()) <= set(versions) and CHAMPION in aliases

    history = registry.history()
    assert [e.time for e in history] == sorted(e.time for e in history)
    champion_moves = [e for e in history if e.alias == CHAMPION]
    assert (champion_moves[0].from_version, champion_moves[0].to_version) == (None, "1")
    assert champion_moves[0].actor.startswith(f"flow run {first.flow_run} (")
    for before, after in zip(champion_moves, champion_moves[1:], strict=False):
        assert after.from_version == before.to_version
        assert after.actor.startswith(f"flow run {second.flow_run} (")
    assert champion_moves[-1].to_version == aliases[CHAMPION]
    for alias, version in aliases.items():  # every alias is where its last move put it
        assert [e.to_version for e in history if e.alias == alias][-1] == version
