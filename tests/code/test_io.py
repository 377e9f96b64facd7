import os

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
