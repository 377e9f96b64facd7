"""The DVC remote unreachable (issue 18, point 2): the data version is still recorded locally
and the run goes on; the push is left pending and the next run pushes it, and says so."""

from __future__ import annotations

import json
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
    return sum(1 for p in remote.rglob("*") if p.is_file()) if remote.is_dir() else 0


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
    assert "with 1 pending from an earlier run" in second.note
    assert second.pushed_files == 4  # each run's file and .dir listing
    assert remote_files(good) == 4
    assert not pending_path(root).exists()

    third = record_data_version(root, root / "data" / "runs" / "b" / "prepared", False)
    assert third.note.endswith("pushed 0 file(s) to DVC remote 'local'")  # nothing pending
