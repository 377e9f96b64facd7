"""The whole flow with the model stages, end to end on a small slice of the default data:
real Prefect (test harness), real DVC, real MLflow (sqlite in the temporary project)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run
from prefect.client.orchestration import get_client
from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.config import EmbeddedSource, load_config
from flywheel.flows.pipeline import pipeline
from flywheel.flows.report import stage_of, task_runs
from flywheel.flows.result import summary_lines
from flywheel.flows.stages import CACHED, Stage
from flywheel.io import file_md5
from flywheel.models.predictor import OnnxPredictor
from flywheel.registry import CHAMPION, PREVIOUS, ModelRegistry
from flywheel.sources import read_embedded
from flywheel.tasks.promote import promote_task
from flywheel.tasks.train import META_FILE
from tests.conftest import run
from tests.flows.conftest import flow_run_artifacts, small_project

# In the environment of the `trained` run, as a deployment would have them: none may reach
# MLflow, Prefect or the project's files.
SECRETS = {
    "FLYWHEEL_API_TOKEN": "tok-7f3a9c2e5b1d4086",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-0c8e2f6a4b9d1357",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-pass-5e7c1a3f9b2d4680",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted run of the whole flow (with SECRETS in its environment), with its wall
    time."""
    base = tmp_path_factory.mktemp("trained")
    root = small_project(base / "project", base / "remote")
    started = time.perf_counter()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in SECRETS.items():
            patch.setenv(name, value)
        result = pipeline(params_path=root / "params.yaml")
    return root, result, time.perf_counter() - started


def test_no_secret_from_the_environment_reaches_mlflow_prefect_or_the_files(trained):
    root, result, _ = trained
    client = store(root)
    texts = []  # every MLflow param and tag, of runs and registered versions
    for run_ in client.search_runs([client.get_experiment_by_name("flywheel").experiment_id]):
        texts += [f"{k}={v}" for k, v in {**run_.data.params, **run_.data.tags}.items()]
    for version in client.search_model_versions():
        texts += [f"{k}={v}" for k, v in version.tags.items()]
    for artifact in flow_run_artifacts(result.mlflow_run.lineage.flow_run_id).values():
        texts.append(str(artifact.data))
    assert len(texts) > 50  # the scan saw the run's records
    blob = "\n".join(texts)
    files = [p for p in root.rglob("*") if p.is_file() and ".git" not in p.parts]
    assert any(p.suffix == ".db" for p in files)  # MLflow's store, scanned byte for byte
    for name, value in SECRETS.items():
        assert value not in blob, name
        leaked = [p for p in files if value.encode() in p.read_bytes()]
        assert not leaked, (name, leaked)


def store(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")


def runs_of(root: Path, parent_id: str) -> dict[str, Run]:
    """The parent run and its nested runs, by stage."""
    client = store(root)
    runs = client.search_runs([client.get_experiment_by_name("flywheel").experiment_id])
    return {
        r.data.tags["flywheel.stage"]: r
        for r in runs
        if parent_id in (r.info.run_id, r.data.tags.get("mlflow.parentRunId"))
    }


def test_the_flow_trains_evaluates_and_tracks_in_under_3_minutes(trained):
    root, result, seconds = trained
    assert seconds < 180
    ev, train, base = result.evaluation, result.train, result.baseline
    assert train.steps == 30  # ~480 training texts / 16 per batch, one epoch
    assert train.resumed_from_step is None
    assert (train.model_dir / "flywheel.json").is_file()
    assert ev.report.metrics.rows == result.prepare.rows_per_split["test"]
    assert ev.baseline is base.evaluation
    assert ev.accuracy_gain == pytest.approx(
        ev.report.metrics.accuracy - base.evaluation.metrics.accuracy
    )
    saved = json.loads((ev.report_dir / "report.json").read_text())
    assert saved["metrics"]["accuracy"] == ev.report.metrics.accuracy
    assert {c["name"] for c in saved["behaviour"]} == {
        "swap PII placeholder",
        "swap person name",
        "clear-cut reviews",
    }
    assert (root / "reports" / "evaluation" / "baseline" / "confusion.png").is_file()
    export = result.export
    assert export.directory == train.model_dir.parent / "onnx"
    assert export.chosen in {"int8", "int8-per-channel"}
    assert export.fp32_max_logit_diff < 1e-4
    predictor = OnnxPredictor(export.directory)
    assert predictor.labels == ev.report.labels
    lines = summary_lines(result)  # what `flywheel run` prints
    assert lines["evaluate"].startswith(f"test accuracy {ev.report.metrics.accuracy:.4f}")
    assert lines["export"].startswith(f"{export.chosen} (0 node groups kept fp32)")
    assert lines["mlflow"].endswith(result.mlflow_run.run_id)


def test_one_parent_run_with_nested_stage_runs_and_lineage(trained):
    root, result, _ = trained
    client = store(root)
    experiment = client.get_experiment_by_name("flywheel")
    assert len(client.search_runs([experiment.experiment_id])) == 7
    runs = runs_of(root, result.mlflow_run.run_id)
    assert set(runs) == {
        "pipeline",
        "baseline",
        "train",
        "evaluate",
        "export",
        "register",
        "promote",
    }
    parent = runs.pop("pipeline")
    assert result.mlflow_run.run_id == parent.info.run_id
    assert "mlflow.parentRunId" not in parent.data.tags
    commit = run(["git", "rev-parse", "HEAD"], root).stdout.strip()
    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(parent.data.tags["flywheel.flow_run_id"])
    assert parent.info.run_name == flow_run.name
    for stage in [parent, *runs.values()]:
        tags = stage.data.tags
        assert tags["flywheel.data_version"] == result.data_version
        assert tags["mlflow.source.git.commit"] == commit
        assert tags["flywheel.git_dirty"] == "false"  # dvc.lock was written by the run itself
        assert tags["flywheel.flow_run_id"] == str(flow_run.id)
        assert stage.info.status == "FINISHED"
        # the full resolved config on every run
        assert stage.data.params["train.lr"] == "0.0001"
        assert stage.data.params["train.max_length"] == "32"
        assert stage.data.params["split.val"] == "0.1"
    for stage in runs.values():
        assert stage.data.tags["mlflow.parentRunId"] == parent.info.run_id


def test_curves_metrics_datasets_and_artifacts_are_logged(trained):
    root, result, _ = trained
    runs = runs_of(root, result.mlflow_run.run_id)
    client = store(root)
    train_run = runs["train"]
    losses = client.get_metric_history(train_run.info.run_id, "train_loss")
    assert [m.step for m in sorted(losses, key=lambda m: m.step)] == list(range(2, 31, 2))
    assert train_run.data.metrics["best_val_macro_f1"] == result.train.best_val_macro_f1

    def inputs(r):
        return {
            next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
            for d in r.inputs.dataset_inputs
        }

    assert set(inputs(train_run)) == {"train", "val"}
    assert set(inputs(runs["pipeline"])) == {"train", "val", "test"}
    train_set = inputs(train_run)["train"]
    assert train_set.digest == file_md5(result.prepare.split_paths["train"])
    assert train_set.name == f"train@{result.data_version}"

    evaluate = runs["evaluate"].data.metrics
    assert evaluate["test_accuracy"] == result.evaluation.report.metrics.accuracy
    assert evaluate["baseline_test_accuracy"] == result.baseline.evaluation.metrics.accuracy
    assert "test_class.fresh.f1" in evaluate and "behaviour.swap person name.pass_rate" in evaluate
    assert runs["pipeline"].data.metrics["accuracy_gain_vs_baseline"] == pytest.approx(
        result.evaluation.accuracy_gain
    )
    assert runs["baseline"].data.params["baseline.C"] == str(result.baseline.fit.chosen["C"])

    def files(r, path=""):
        return {f.path for f in client.list_artifacts(r.info.run_id, path)}

    assert {"report.json", "confusion.png", "reliability.png"} <= files(runs["evaluate"])
    assert {"model/flywheel.json", "model/model.safetensors", "model/tokenizer.json"} <= files(
        train_run, "model"
    )
    assert "model/model.joblib" in files(runs["baseline"], "model")
    exported = runs["export"]
    assert exported.data.tags["flywheel.export.chosen"] == result.export.chosen
    assert exported.data.metrics["fp32_max_logit_diff"] == result.export.fp32_max_logit_diff
    assert "test_agreement" in exported.data.metrics
    assert "parity.json" in files(exported)


def test_the_export_is_registered_promoted_and_loads_by_alias(trained, monkeypatch):
    root, result, _ = trained
    registered, decision = result.registered, result.promotion
    assert (registered.name, registered.version) == ("flywheel-classifier", "1")
    assert decision.promoted and decision.champion_before is None  # the first model
    registry = ModelRegistry.of(load_config(root / "params.yaml"))
    assert registry.alias(CHAMPION) == "1"
    tags = registry.version("1").tags
    commit = run(["git", "rev-parse", "HEAD"], root).stdout.strip()
    assert tags["flywheel.data_version"] == result.data_version
    assert tags["flywheel.git_commit"] == commit
    assert tags["flywheel.flow_run_id"] == result.mlflow_run.lineage.flow_run_id
    assert tags["flywheel.mlflow_run_id"] == result.mlflow_run.run_id
    assert tags["flywheel.variant"] == result.export.chosen
    assert float(tags["flywheel.test.macro_f1"]) == pytest.approx(
        registered.report.metrics.macro_f1, abs=1e-6
    )
    assert float(tags["flywheel.parity.test_agreement"]) == pytest.approx(
        result.export.test.agreement, abs=1e-6
    )
    assert float(tags["flywheel.latency.p95_ms"]) == pytest.approx(
        result.export.latency.p95_ms, abs=0.01
    )
    assert tags["flywheel.promotion"] == "promoted"
    # the registered model's own evaluation went through the ONNX predictor
    assert registered.report.model == "onnx"
    assert (root / "reports" / "evaluation" / "onnx" / "report.json").is_file()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.uri)
    model = mlflow.pyfunc.load_model("models:/flywheel-classifier@champion")
    out = model.predict(["A wonderful, moving film.", "A dull, lifeless mess."])
    assert {o["label"] for o in out} <= {"fresh", "rotten"}
    assert sum(out[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    lines = summary_lines(result)
    assert lines["register"].startswith("models:/flywheel-classifier/1: ONNX test accuracy")
    assert lines["promote"].startswith("version 1 is champion (all gates passed; no champion)")
    [entry] = registry.history()
    assert entry.actor.startswith("flow run ") and entry.to_version == "1"


def test_the_flow_run_page_has_a_summary_and_a_per_class_table(trained):
    root, result, _ = trained
    artifacts = flow_run_artifacts(result.mlflow_run.lineage.flow_run_id)
    assert set(artifacts) == {"flywheel-run-summary", "flywheel-per-class"}
    summary = artifacts["flywheel-run-summary"].data
    m = result.registered.report.metrics
    assert f"data version `{result.data_version}`" in summary
    assert result.validation.headline in summary
    assert f"| exported ONNX ({result.export.chosen}), version 1 | {m.accuracy:.4f} |" in summary
    assert "version 1 is champion (all gates passed; no champion)" in summary
    assert "- pass: test macro-F1" in summary
    assert result.mlflow_run.run_id in summary and "models:/flywheel-classifier/1" in summary
    table = json.loads(artifacts["flywheel-per-class"].data)
    assert {(r["model"], r["label"]) for r in table} == {
        (model, label)
        for model in ("fine-tuned", "baseline", "onnx")
        for label in ("fresh", "rotten")
    }
    onnx = next(r for r in table if r["model"] == "onnx" and r["label"] == "fresh")
    assert onnx["f1"] == round(m.per_class["fresh"].f1, 4)


def test_models_cli_lists_compares_promotes_and_rolls_back(trained):
    root, result, _ = trained
    params = str(root / "params.yaml")
    registry = ModelRegistry.of(load_config(root / "params.yaml"))
    registry.register(
        result.export.directory,
        result.mlflow_run,
        {"flywheel.parity.passed": "true", "flywheel.data_version": result.data_version},
        "the same export again",
    )

    def models(*args: str, code: int = 0) -> str:
        out = CliRunner().invoke(app, ["models", *args, "--params", params])
        assert out.exit_code == code, out.output
        return out.output

    listed = models("list")
    rows = [line.split() for line in listed.splitlines() if line[:1].isdigit()]
    assert [row[:2] for row in rows] == [["2", "-"], ["1", "champion"]]
    assert result.data_version[:12] in listed
    same = models("compare", "champion", "2")
    assert "0 disagreements (0.00%)" in same and "per-slice accuracy" in same
    refused = models(
        "promote", "2", "--reason", "too strict", "--set", "registry.min_test_macro_f1=1.0", code=1
    )
    assert "FAIL: test macro-F1" in refused and "version 2 is not promoted" in refused
    assert registry.alias(CHAMPION) == "1"
    promoted = models("promote", "2", "--reason", "identical model: a tie")
    assert "version 2 is champion (all gates passed; champion was 1)" in promoted
    assert (registry.alias(CHAMPION), registry.alias(PREVIOUS)) == ("2", "1")
    models("promote", "2", "--reason", "again", code=2)  # already champion: a clear error
    models("rollback", "--reason", "undo")
    assert (registry.alias(CHAMPION), registry.alias(PREVIOUS)) == ("1", "2")
    history = models("history").splitlines()
    assert len(history) == 5
    assert "champion: 1 -> 2" in history[1] and "via flywheel models promote" in history[1]
    assert "champion: 2 -> 1" in history[3] and "undo" in history[3]

    # the pipeline does not promote a rolled-back version again by itself
    cfg = load_config(root / "params.yaml")
    assert registry.version("2").tags["flywheel.promotion"] == "rolled-back"
    again = replace(result.registered, version="2")
    refused = promote_task.fn(cfg, result.prepare, again, result.mlflow_run, "test")
    assert not refused.promoted and not refused.moves
    assert "version 2 was rolled back" in refused.reasons[0]
    # the pipeline's promote stage with a champion in place: it is re-scored on the test split
    third = registry.register(
        result.export.directory,
        result.mlflow_run,
        {"flywheel.parity.passed": "true", "flywheel.data_version": result.data_version},
        "the same export once more",
    )
    again = replace(result.registered, version=third.version)
    decision = promote_task.fn(cfg, result.prepare, again, result.mlflow_run, "test")
    assert decision.promoted and decision.champion_before == "1"
    assert decision.champion_scores["test_macro_f1"] == pytest.approx(
        result.registered.report.metrics.macro_f1, abs=1e-6
    )  # version 1 is the same model: re-scored, it scores what it was registered with
    assert decision.paired.discordant == (0, 0)  # the same answers, text by text
    assert registry.aliases() == {CHAMPION: "3", PREVIOUS: "1"}


def wait_for_checkpoint(root: Path, min_step: int, proc: subprocess.Popen, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "exited"
        for meta in root.glob(f"checkpoints/*/last/{META_FILE}"):
            try:
                step = json.loads(meta.read_text())["step"]
            except (OSError, ValueError):
                continue  # being replaced right now
            if step >= min_step:
                return step
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint at step >= {min_step} within {timeout} s")


def test_killed_run_resumes_to_the_same_result(trained, tmp_path):
    """`flywheel run` killed (SIGKILL) mid-training, then run again: it resumes from the last
    checkpoint by itself and reaches the same final metrics."""
    _, straight, _ = trained
    root = small_project(tmp_path / "project", tmp_path / "remote")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(
        [str(Path(sys.prefix) / "bin" / "flywheel"), "run", "--params", str(root / "params.yaml")],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the kill reaches Prefect's server too
    )
    try:
        wait_for_checkpoint(root, 10, proc, timeout=240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    resumed = pipeline(params_path=root / "params.yaml")
    assert resumed.data_version == straight.data_version
    assert 10 <= resumed.train.resumed_from_step < 30
    assert resumed.train.steps == straight.train.steps
    assert resumed.train.best_val_macro_f1 == pytest.approx(
        straight.train.best_val_macro_f1, abs=1e-6
    )
    got, want = resumed.evaluation.report.metrics, straight.evaluation.report.metrics
    assert got.accuracy == pytest.approx(want.accuracy, abs=1e-6)
    assert got.macro_f1 == pytest.approx(want.macro_f1, abs=1e-6)
    tags = runs_of(root, resumed.mlflow_run.run_id)["train"].data.tags
    assert tags["flywheel.resumed_from_step"] == str(resumed.train.resumed_from_step)


def ran(result) -> list[str]:
    return [stage for stage, how in result.plan.summary().items() if how == "ran"]


def task_states(flow_run_id: str) -> dict[str, str]:
    """Task name -> state name of one flow run ("Cached" for a reused stage)."""
    return {stage_of(r): r.state.name for r in task_runs(flow_run_id)}


@pytest.mark.long
def test_cache_unchanged_reuses_param_change_reruns_downstream_data_change_reruns_all(trained):
    """The cache matrix on one project: unchanged -> reused (in a fraction of the first run's
    time); --dry-run says what a new lr would do and writes nothing; the new lr re-runs train and
    what follows, not the data stages nor the baseline; a deleted export is recomputed; new rows
    re-run everything."""
    root, first, first_seconds = trained
    params = root / "params.yaml"
    drop = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    fresh = subprocess.run(  # a new process: the persisted results and the ledger are on disk
        [str(Path(sys.prefix) / "bin" / "flywheel"), "run", "--params", str(params)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "reused: validate, prepare, baseline, train, evaluate, export, register" in fresh.stdout
    started = time.perf_counter()
    again = pipeline(params_path=params)
    cached_seconds = time.perf_counter() - started
    assert ran(again) in ([], ["promote"])  # promote only if the champion moved since
    assert again.train == first.train and again.export == first.export
    assert again.registered.version == first.registered.version  # no duplicate version
    assert cached_seconds < 0.25 * first_seconds, (cached_seconds, first_seconds)
    states = task_states(again.mlflow_run.lineage.flow_run_id)
    assert states["train"] == states["export"] == states["prepare"] == "Cached"
    assert states["collect"] == "Completed"
    assert summary_lines(again)["cache"].startswith("reused: validate, prepare, baseline, train")
    tags = store(root).get_run(again.mlflow_run.run_id).data.tags
    assert tags["flywheel.cache.train"] == "reused"

    ledger = sorted(p.stat().st_mtime_ns for p in (root / ".flywheel").rglob("*"))
    prepared = {p: p.stat().st_mtime_ns for p in (root / "data" / "prepared").iterdir()}
    dry = CliRunner().invoke(
        app, ["run", "--params", str(params), "--dry-run", "--set", "train.lr=2e-4"]
    )
    assert dry.exit_code == 0, dry.output
    assert f"the data version would be {first.data_version}" in dry.output
    plan_lines = {line.split()[0]: line for line in dry.output.splitlines()[2:]}
    assert plan_lines["baseline"].split()[1] == "reuse"
    assert plan_lines["train"].split()[1] == "run"
    assert plan_lines["train"].endswith("config train.lr 0.0001 -> 0.0002")
    assert plan_lines["export"].endswith("train runs")
    assert sorted(p.stat().st_mtime_ns for p in (root / ".flywheel").rglob("*")) == ledger
    assert {p: p.stat().st_mtime_ns for p in prepared} == prepared

    lr = pipeline(params_path=params, overrides={"train.lr": 2e-4})
    assert ran(lr)[:4] == ["train", "evaluate", "export", "register"]
    assert lr.data_version == first.data_version and lr.baseline == first.baseline
    assert lr.train.model_dir != first.train.model_dir
    assert int(lr.registered.version) > int(first.registered.version)

    shutil.rmtree(lr.export.directory)
    rebuilt = pipeline(params_path=params, overrides={"train.lr": 2e-4})
    assert ran(rebuilt)[:2] == ["export", "register"]
    assert rebuilt.plan.steps[Stage.EXPORT].reason.endswith("was deleted")
    assert (rebuilt.export.directory / "model.onnx").is_file()

    source = root / "data" / "sources" / "slice.csv"
    extra = read_embedded(EmbeddedSource(kind="embedded")).tail(40)
    pd.concat([pd.read_csv(source), extra[["text", "label"]]]).to_csv(source, index=False)
    grown = pipeline(params_path=params)
    assert grown.data_version != first.data_version
    assert ran(grown) == [s.name for s in CACHED]  # every cached stage, in pipeline order
    assert grown.plan.steps[Stage.VALIDATE].reason.startswith("data ")


@pytest.mark.long
def test_a_run_killed_during_export_registers_nothing_and_the_rerun_succeeds(trained):
    """`flywheel run --force-from export` killed (SIGKILL, the whole process group) while the
    export is writing its staging folder: no version is registered, no alias moves, the last
    export folder is whole; the same run again re-exports, registers and decides."""
    root, _, _ = trained
    params = root / "params.yaml"
    registry = ModelRegistry.of(load_config(params))
    versions, aliases = [v.version for v in registry.versions()], registry.aliases()
    drop = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME")
    proc = subprocess.Popen(
        [str(Path(sys.prefix) / "bin" / "flywheel"), "run", "--params", str(params)]
        + ["--force-from", "export"],
        cwd=root,
        env={k: v for k, v in os.environ.items() if k not in drop},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill reaches Prefect's server too
    )
    try:
        deadline = time.monotonic() + 300
        while not any(
            (staging / "search").is_dir() for staging in root.rglob(".*.staging-*")
        ):  # the export is searching its int8 variants
            assert proc.poll() is None and time.monotonic() < deadline, proc.returncode
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert [v.version for v in registry.versions()] == versions
    assert registry.aliases() == aliases
    rerun = pipeline(params_path=params, force_from=Stage.EXPORT)
    assert ran(rerun)[:2] == ["export", "register"]
    assert int(rerun.registered.version) == int(versions[-1]) + 1
    assert (rerun.export.directory / "model.onnx").is_file()
    assert registry.load(rerun.registered.version).predict(["a fine film"])
