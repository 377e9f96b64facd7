import os
import subprocess
import sys

import pytest

from flywheel.errors import FlywheelError
from flywheel.io import OUTPUT_MARKER, recover_dir, replace_dir_atomic


def fill_with(name: str):
    return lambda staging: (staging / name).write_text(name)


def test_replaces_its_own_output_whole(tmp_path):
    target = tmp_path / "out"
    replace_dir_atomic(target, fill_with("first"))
    replace_dir_atomic(target, fill_with("second"))
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "second"]


def test_a_failing_fill_leaves_the_old_output(tmp_path):
    target = tmp_path / "out"
    replace_dir_atomic(target, fill_with("first"))

    def broken(staging):
        (staging / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        replace_dir_atomic(target, broken)
    assert (target / "first").is_file()
    assert not (target / "half").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left behind


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    target = tmp_path / "Desktop"
    target.mkdir()
    (target / "important_notes.txt").write_text("keep me")
    with pytest.raises(FlywheelError, match="was not written by flywheel"):
        replace_dir_atomic(target, fill_with("report"))
    assert (target / "important_notes.txt").read_text() == "keep me"


def test_an_empty_folder_may_be_used(tmp_path):
    target = tmp_path / "new"
    target.mkdir()
    replace_dir_atomic(target, fill_with("report"))
    assert (target / "report").is_file()


def test_a_swap_killed_between_its_renames_is_recovered(tmp_path):
    target = tmp_path / "last"
    replace_dir_atomic(target, lambda d: (d / "state").write_text("step 6"))
    # What a kill between the two os.replace calls leaves: the old copy aside, no target, and
    # the new copy's staging folder.
    os.replace(target, tmp_path / ".last.old-abc")
    (tmp_path / ".last.staging-abc").mkdir()
    recover_dir(target)
    assert (target / "state").read_text() == "step 6"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    replace_dir_atomic(target, lambda d: (d / "state").write_text("step 8"))
    assert (target / "state").read_text() == "step 8"


@pytest.fixture
def live_pid():
    """The pid of a process that runs until the test ends."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait(timeout=30)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def test_recovery_never_touches_a_live_runs_folders(tmp_path, live_pid):
    """Another run, still writing the same output, owns a staging folder and (between its two
    renames) the old copy: recovery by this run leaves both; a dead run's are removed."""
    target = tmp_path / "prepared"
    replace_dir_atomic(target, fill_with("v1"))
    live = [tmp_path / f".prepared.{kind}-{live_pid}-abc" for kind in ("staging", "old")]
    dead = [tmp_path / f".prepared.{kind}-{dead_pid()}-def" for kind in ("staging", "old")]
    for folder in live + dead:
        folder.mkdir()
        (folder / "part.parquet").write_text("rows")
    replace_dir_atomic(target, fill_with("v2"))  # recovers first
    assert all((folder / "part.parquet").is_file() for folder in live)
    assert not any(folder.exists() for folder in dead)
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "v2"]


def test_a_folder_being_written_names_its_owner(tmp_path):
    target = tmp_path / "out"
    seen = []
    replace_dir_atomic(target, lambda staging: seen.append(staging.name))
    assert seen[0].startswith(f".out.staging-{os.getpid()}-")


def test_a_swap_failing_between_its_renames_keeps_the_old_output(tmp_path, monkeypatch):
    target = tmp_path / "out"
    replace_dir_atomic(target, fill_with("first"))
    real_replace = os.replace

    def refuse_staging(src, dst):
        if ".staging-" in str(src):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_staging)
    with pytest.raises(OSError, match="disk full"):
        replace_dir_atomic(target, fill_with("second"))
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "first"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
