"""`make clean-state` keeps the model registry and the DVC remote unless ALL=1 (issue 18)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import REPO

GENERATED = ["checkpoints", "reports", ".prefect", ".flywheel", "data/prepared", "data/raw"]
KEPT = ["mlflow", "dvc-remote", "data/feedback", ".venv-marker"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("everything", [False, True])
def test_clean_state_keeps_the_registry_and_remote_unless_all(tmp_path, everything):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    for folder in GENERATED + KEPT:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "file").write_text("x")
    command = ["make", "-s", "clean-state"] + (["ALL=1"] if everything else [])
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert not any((tmp_path / folder).exists() for folder in GENERATED)
    for folder in ("mlflow", "dvc-remote"):
        assert (tmp_path / folder).exists() is not everything, (folder, done.stdout)
    assert (tmp_path / "data/feedback/file").exists()  # users' corrections are never generated
    assert ("ALL=1 deletes them" in done.stdout) is not everything
