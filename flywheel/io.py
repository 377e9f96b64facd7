"""File I/O shared by the stages: every output appears whole or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from flywheel.errors import FlywheelError

T = TypeVar("T")

# Written into every folder replace_dir_atomic fills: only such folders may be replaced later.
OUTPUT_MARKER = ".flywheel-output"


# --- durable replacement: after a crash or power loss, the old content or the whole new one ----


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then every folder, deepest first (`folder` last)."""
    folders = [folder]
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            continue
        if path.is_dir():
            folders.append(path)
        else:
            fsync_path(path)
    for path in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_path(path)


def replace_durably(written: Path | str, target: Path) -> None:
    """Rename the file `written` (beside `target`) to `target`, so that even after a power
    loss `target` holds the old content or the whole new one: the data reaches the disk before
    the rename (else a journaling file system may keep the rename and lose the data: an empty
    file), and the rename, by an fsync of the folder, before this returns."""
    fsync_path(Path(written))
    os.replace(written, target)
    fsync_path(target.parent)


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(temporary path)` beside `path`, then `replace_durably` into place; on error
    `path` is untouched and the temporary file removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        replace_durably(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write a table whole or not at all (`write_atomic`)."""
    write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))


def write_json_atomic(path: Path, payload: Any) -> None:
    """`write_json`, whole or not at all (`write_atomic`): for state files that later runs
    read (the stage ledger, the retrain state)."""
    write_atomic(path, lambda tmp: write_json(tmp, payload))


def file_md5(path: Path) -> str:
    """md5 of a file's bytes (DVC's file hash)."""
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_verified(path: Path, sha256: str, error: type[Exception]) -> bytes:
    """The bytes of a vendored file, refused with `error` when they do not hash to `sha256`."""
    payload = path.read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != sha256:
        raise error(
            f"{path}: checksum mismatch (sha256 {digest}, expected {sha256}); the vendored data "
            "set is damaged: reinstall flywheel"
        )
    return payload


def read_parquet(path: Path) -> pd.DataFrame:
    """Read a stage output, with a hint about which stage makes it when it is missing."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: run the stage that writes it first (flywheel run)"
        )
    return pd.read_parquet(path)


def write_json(path: Path, payload: Any) -> None:
    """Stable JSON (sorted keys, two-space indent, trailing newline): same data, same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n", "utf-8"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _leftovers(target: Path, kind: str) -> list[Path]:
    """The `kind` ("staging" or "old") folders of `target` whose owner has died: their names
    carry the pid of the process that made them, and a live owner's folder is never touched.
    A name without a pid is from a Flywheel before owners were recorded: a leftover."""
    prefix = f".{target.name}.{kind}-"
    found = []
    for path in target.parent.glob(f"{prefix}*"):
        owner = path.name[len(prefix) :].split("-", 1)[0]
        if not (owner.isdigit() and _alive(int(owner))):
            found.append(path)
    return found


def recover_dir(target: Path) -> None:
    """Clean up after a process killed inside `replace_dir_atomic`: drop its staging folders and,
    if it died between the two renames (target gone, old copy kept), put the old copy back.
    Folders of a process still running (another run writing the same output) are left alone."""
    for staging in _leftovers(target, "staging"):
        shutil.rmtree(staging, ignore_errors=True)
    olds = sorted(_leftovers(target, "old"), key=lambda p: p.stat().st_mtime)
    if olds and not target.exists():
        os.replace(olds.pop(), target)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def replace_dir_atomic(target: Path, fill: Callable[[Path], T]) -> T:
    """Fill a staging folder beside `target`, then swap it in; on error `target` is untouched,
    and after a power loss it is the old folder or the whole new one (`sync_tree`).

    A non-empty `target` that Flywheel did not write (no marker file) is never replaced: a
    mistyped --report-dir must not delete someone's folder.
    """
    recover_dir(target)
    if target.is_dir() and any(target.iterdir()) and not (target / OUTPUT_MARKER).is_file():
        raise FlywheelError(
            f"{target} exists and was not written by flywheel; refusing to replace it "
            "(choose an empty or new folder)"
        )
    if target.exists() and not target.is_dir():
        raise FlywheelError(f"{target} exists and is not a folder; refusing to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.staging-"
    # The owner's pid in the name: recover_dir leaves the folders of a live process alone.
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{prefix}{os.getpid()}-"))
    staging.chmod(0o755)
    old = target.parent / f".{target.name}.old-{staging.name[len(prefix) :]}"
    try:
        result = fill(staging)
        (staging / OUTPUT_MARKER).write_text("written by flywheel; replaced whole on each run\n")
        sync_tree(staging)  # its files on disk before the folder takes the target's name
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
        fsync_path(target.parent)
        return result
    finally:
        if old.exists() and not target.exists():  # stopped between the renames: keep the old
            os.replace(old, target)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
