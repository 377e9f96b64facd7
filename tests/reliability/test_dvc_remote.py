"""The DVC remote unreachable, or the run killed during its push (issue 18, point 2): the data
version is still recorded locally; the push is left pending and the next run pushes it, and says
so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from flywheel.tasks.version import pending_path, record_data_version
from tests.conftest import make_project

DVC = str(Path(sys.prefix) / "bin" / "dvc")


def prepared(root: Path, name: str, payload: bytes) -> Path:
    folder = root / "data" / "runs" / name / "prepared"
    folder.mkdir(parents=True)
    (folder / "train.parquet").write_bytes(payload)
    return folder


def remote_files(remote: Path) -> int:
    """Objects in the remote. DVC copies each into a `.<random>.tmp` file and renames it when
    complete; a push killed mid-copy leaves the partial files of the copies under way, which
    DVC never reads as objects."""
    if not remote.is_dir():
        return 0
    return sum(1 for p in remote.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))


def test_an_unreachable_remote_leaves_the_push_pending_for_the_next_run(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the remote's parent folder should be")
    root = make_project(tmp_path / "project", blocker / "remote")  # every push fails (ENOTDIR)

    first = record_data_version(root, prepared(root, "a", b"first rows"), pipeline_run=False)
    assert first.pointer is not None and first.pointer.is_file()  # recorded locally all the same
    assert first.pushed_files == 0
    assert "push to DVC remote 'local' FAILED" in first.note
    assert "the next run pushes it (1 target(s) pending)" in first.note
    pending = json.loads(pending_path(root).read_text())
    assert pending == ["data/runs/a/prepared.dvc"]

    good = tmp_path / "remote"
    subprocess.run([DVC, "remote", "modify", "local", "url", str(good)], cwd=root, check=True)
    second = record_data_version(root, prepared(root, "b", b"second rows"), pipeline_run=False)
    assert "with 1 target(s) an earlier run left unpushed" in second.note
    assert second.pushed_files == 4  # each run's file and .dir listing
    assert remote_files(good) == 4
    assert not pending_path(root).exists()

    third = record_data_version(root, root / "data" / "runs" / "b" / "prepared", False)
    assert third.note.endswith("pushed 0 file(s) to DVC remote 'local'")  # nothing pending


KILLED_DURING_PUSH = """
import os, signal, sys, threading, time
from pathlib import Path
import flywheel.tasks.version as version
push = version._push
def kill_once_files_arrive(remote):
    while not any(p.is_file() for p in remote.rglob("*")):
        time.sleep(0.005)
    os.killpg(0, signal.SIGKILL)  # this process and the `dvc push` it started
def killed_during_push(root, targets):
    threading.Thread(target=kill_once_files_arrive, args=(Path(sys.argv[3]),)).start()
    return push(root, targets)
version._push = killed_during_push
version.record_data_version(Path(sys.argv[1]), Path(sys.argv[2]), pipeline_run=False)
print("the push finished before the kill", flush=True)
"""


def test_a_run_killed_during_its_push_leaves_it_pending_and_the_next_run_pushes_it(tmp_path):
    remote = tmp_path / "remote"
    root = make_project(tmp_path / "project", remote)
    folder = prepared(root, "a", os.urandom(1 << 20))
    for i in range(60):  # many files: the push is still copying when the kill comes
        (folder / f"part-{i}.parquet").write_bytes(os.urandom(1 << 18))
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_DURING_PUSH, str(root), str(folder), str(remote)],
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,  # its own process group, which it kills
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert 0 < remote_files(remote) < 62  # the push was cut half-way (61 files and the listing)
    assert json.loads(pending_path(root).read_text()) == ["data/runs/a/prepared.dvc"]

    after = record_data_version(root, prepared(root, "b", b"more rows"), pipeline_run=False)
    assert "with 1 target(s) an earlier run left unpushed" in after.note
    assert not pending_path(root).exists()
    assert remote_files(remote) == 62 + 2  # all of the first version, then the second's
    status = subprocess.run(
        [DVC, "status", "--cloud", "data/runs/a/prepared.dvc"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "up to date" in status.stdout.lower() or "in sync" in status.stdout.lower()
