"""Tracking against a real MLflow sqlite store in a temporary project."""

import subprocess

import mlflow

from flywheel import tracking


def test_runs_params_metrics_and_lineage_land_in_the_project_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    exp = tracking.experiment_id(tmp_path)
    assert (tmp_path / "mlflow" / "mlflow.db").is_file()
    assert tracking.experiment_id(tmp_path) == exp  # found, not created twice

    commit, dirty = tracking.git_state(tmp_path)
    assert (commit, dirty) == ("unknown", True)  # no commit yet
    lineage = tracking.Lineage("abc.dir", commit, dirty, "flow-1")
    params = tracking.flatten({"seed": 42, "train": {"lr": 5e-5, "epochs": 1}})
    assert params == {"seed": "42", "train.lr": "5e-05", "train.epochs": "1"}
    many = {f"p{i}": str(i) for i in range(250)}  # more than one batch

    with (
        mlflow.start_run(experiment_id=exp, run_name="parent") as parent,
        mlflow.start_run(experiment_id=exp, run_name="train", nested=True) as child,
    ):
        tracking.log_params_and_tags(child.info.run_id, {**params, **many}, lineage.tags())
        n = tracking.log_metrics(
            child.info.run_id, [("loss", 1.0 / (s + 1), s) for s in range(1500)]
        )
    assert n == 1500
    run = mlflow.get_run(child.info.run_id)
    assert run.data.params["train.lr"] == "5e-05"
    assert len(run.data.params) == 253
    assert run.data.tags["flywheel.data_version"] == "abc.dir"
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    history = mlflow.MlflowClient().get_metric_history(child.info.run_id, "loss")
    assert len(history) == 1500
    assert sorted(m.step for m in history)[-1] == 1499


def test_env_overrides_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking.tracking_uri(tmp_path) == "sqlite:////elsewhere/x.db"
