"""Durable state writes (issue 18, point 2): fsync of the file before its rename and of the
folder after, for the helper and the state files that use it."""

from __future__ import annotations

import os

import pytest

from flywheel.io import OUTPUT_MARKER, replace_dir_atomic


@pytest.fixture
def disk_calls(monkeypatch):
    """os.fsync and os.replace as made from here on, in order: ("fsync", path) and
    ("replace", source, target)."""
    from pathlib import Path

    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(source, target):
        calls.append(("replace", Path(source), Path(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


def assert_durable_file_write(calls, target):
    """The new content was flushed before it took `target`'s name, and the rename after."""
    renames = [c for c in calls if c[0] == "replace" and c[2] == target]
    assert len(renames) == 1, calls
    _, written, _ = renames[0]
    at = calls.index(renames[0])
    assert written.parent == target.parent  # a rename within one file system
    assert ("fsync", written) in calls[:at]
    assert ("fsync", target.parent) in calls[at + 1 :]


def test_write_json_atomic_flushes_the_file_then_the_rename(tmp_path, disk_calls):
    from flywheel.io import write_json_atomic

    target = tmp_path / "state.json"
    write_json_atomic(target, {"step": 1})
    assert_durable_file_write(disk_calls, target)
    assert target.read_text() == '{\n  "step": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left


def test_a_failed_flush_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import errno

    from flywheel.io import write_json_atomic

    target = tmp_path / "state.json"
    write_json_atomic(target, {"step": 1})

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        write_json_atomic(target, {"step": 2})
    assert target.read_text() == '{\n  "step": 1\n}\n'  # never renamed over the old state
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_replace_dir_atomic_flushes_every_file_before_the_swap(tmp_path, disk_calls):
    target = tmp_path / "checkpoint"

    def fill(staging):
        (staging / "model.safetensors").write_bytes(b"weights")
        (staging / "tokenizer").mkdir()
        (staging / "tokenizer" / "vocab.txt").write_text("a\n")

    replace_dir_atomic(target, fill)
    swap = next(c for c in disk_calls if c[0] == "replace" and c[2] == target)
    staging, at = swap[1], disk_calls.index(swap)
    flushed = {c[1] for c in disk_calls[:at] if c[0] == "fsync"}
    for name in ("model.safetensors", "tokenizer/vocab.txt", OUTPUT_MARKER, "tokenizer", "."):
        assert (staging / name).resolve() in flushed, name
    assert ("fsync", tmp_path) in disk_calls[at + 1 :]


def test_the_stage_ledger_and_the_retrain_state_are_written_durably(tmp_path, disk_calls):
    from flywheel import cache, trigger
    from flywheel.flows.stages import Stage

    cache.Ledger(tmp_path).record(cache.StageKey(Stage.TRAIN, {"data": "1"}), {}, {}, None)
    assert_durable_file_write(disk_calls, tmp_path / "train.json")
    disk_calls.clear()
    trigger.write_firing(tmp_path, trigger.Firing("2026-12-03T12:00:00+00:00", {}))
    assert_durable_file_write(disk_calls, tmp_path / trigger.STATE_FILE)
