"""File I/O shared by the stages: every output appears whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd


def write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write a table to a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


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


def replace_dir_atomic(target: Path, fill: Callable[[Path], None]) -> None:
    """Fill a staging folder beside `target`, then swap it in; on error `target` is untouched."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging-"))
    staging.chmod(0o755)
    old = target.parent / f".{target.name}.old-{staging.name.rsplit('-', 1)[-1]}"
    try:
        fill(staging)
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
