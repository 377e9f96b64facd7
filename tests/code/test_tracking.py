"""Tracking against a real MLflow sqlite store in a temporary project."""

import os
import subprocess

import pytest
from mlflow import MlflowClient

from flywheel import tracking


def git(root, *args):
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def test_runs_params_metrics_and_lineage_land_in_the_project_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    git(tmp_path, "init", "-q")
    uri, exp = tracking.experiment_id(tmp_path)
    assert uri == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert (tmp_path / "mlflow" / "mlflow.db").is_file()
    assert tracking.experiment_id(tmp_path) == (uri, exp)  # found, not created twice
    assert "MLFLOW_TRACKING_URI" not in os.environ  # no global state left behind

    lineage = tracking.Lineage.of(tmp_path, "abc.dir", "flow-1")
    assert (lineage.git_commit, lineage.git_dirty) == ("unknown", True)  # no commit yet
    params = tracking.flatten({"seed": 42, "train": {"lr": 5e-5, "epochs": 1}})
    assert params == {"seed": "42", "train.lr": "5e-05", "train.epochs": "1"}
    many = {f"p{i}": str(i) for i in range(250)}  # more than one batch

    with (
        tracking.start_run(tmp_path, "pipeline", lineage, run_name="flow-name") as parent,
        tracking.start_run(
            tmp_path, "train", lineage, parent=parent, params={**params, **many}
        ) as child,
    ):
        n = tracking.log_metrics(child, [("loss", 1.0 / (s + 1), s) for s in range(1500)])
    assert n == 1500
    client = MlflowClient(uri)
    run = client.get_run(child.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "5e-05"
    assert len(run.data.params) == 253
    assert run.data.tags["flywheel.data_version"] == "abc.dir"
    assert run.data.tags["flywheel.flow_run_id"] == "flow-1"
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert client.get_run(parent.run_id).info.run_name == "flow-name"
    history = client.get_metric_history(child.run_id, "loss")
    assert len(history) == 1500
    assert sorted(m.step for m in history)[-1] == 1499


def test_a_failing_stage_marks_its_run_failed(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lineage = tracking.Lineage("abc.dir", "c0ffee", False, None)
    with pytest.raises(RuntimeError), tracking.start_run(tmp_path, "train", lineage) as run:
        raise RuntimeError("boom")
    assert MlflowClient(run.uri).get_run(run.run_id).info.status == "FAILED"


def test_git_state_ignores_the_pipelines_own_outputs(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "dvc.lock").write_text("a\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "i")
    commit, dirty = tracking.git_state(tmp_path)
    assert len(commit) == 40 and not dirty
    (tmp_path / "dvc.lock").write_text("b\n")  # a pipeline run rewrote it
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert tracking.git_state(tmp_path) == (commit, False)
    (tmp_path / "code.py").write_text("x = 2\n")
    assert tracking.git_state(tmp_path) == (commit, True)


def test_env_overrides_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking.tracking_uri(tmp_path) == "sqlite:////elsewhere/x.db"
