"""The ONNX graph of a fine-tuned classifier: export from PyTorch (dynamo), onnxruntime's
transformer optimizer, dynamic int8 quantization (per tensor or per channel, node groups kept in
fp32), the node groups int8 touches, and timing (`timed_logits`, `measure_latency`).
Why: docs/decisions/0005-onnx-export-and-int8-search.md.
"""

from __future__ import annotations

import ast
import logging
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flywheel.models.bundle import ClassifierBundle
from flywheel.models.predictor import OnnxPredictor

INPUTS = ("input_ids", "token_type_ids", "attention_mask")


# What dynamic int8 quantizes, by the input holding the constant it quantizes: MatMul and Gemm
# weights, Gather tables (the embeddings). A product of two activations (attention scores) stays
# fp32 whatever is asked, so it belongs to no group.
QUANTIZED_INPUT = {"MatMul": 1, "Gemm": 1, "Gather": 0}


def export_fp32(bundle: ClassifierBundle, path: Path, opset: int) -> Path:
    """The fine-tuned bundle as a single-file ONNX model with dynamic batch and sequence axes."""
    import torch
    from torch.export import Dim

    encoded = bundle.encode(["a short text", "a somewhat longer text to give two lengths"])
    sample = bundle.pad([{k: encoded[k][i] for k in encoded} for i in range(2)])
    names = [n for n in INPUTS if n in sample]
    batch, sequence = Dim("batch"), Dim("sequence")
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # All inputs share batch and sequence; torch warns that it keeps one name for each.
        warnings.filterwarnings("ignore", message="# The axis name")
        torch.onnx.export(
            bundle.model.eval(),
            (),
            str(path),
            kwargs={n: sample[n] for n in names},
            input_names=names,
            output_names=["logits"],
            dynamic_shapes={n: {0: batch, 1: sequence} for n in names},
            opset_version=opset,
            external_data=False,
            dynamo=True,
            verbose=False,
        )
    return path


def node_groups(model_path: Path) -> dict[str, list[str]]:
    """The nodes int8 quantizes (QUANTIZED_INPUT), by the torch module they come from, in graph
    order.

    The dynamo exporter names nodes `node_MatMul_82` but keeps each node's scopes in its
    `pkg.torch.onnx.name_scopes` metadata: [..., 'bert.encoder.layer.0.output.dense', 'linear_5'].
    The module path (second to last) is the group, e.g. `bert.embeddings.word_embeddings` for the
    embedding table's Gather.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    constants = {t.name for t in model.graph.initializer}
    groups: dict[str, list[str]] = {}
    for node in model.graph.node:
        position = QUANTIZED_INPUT.get(node.op_type)
        if position is None or node.input[position] not in constants:
            continue
        scopes = next(
            (p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None
        )
        path = ast.literal_eval(scopes) if scopes else []
        module = path[-2] if len(path) >= 2 else ""
        groups.setdefault(module or node.name, []).append(node.name)
    return groups


@contextmanager
def quiet_onnxruntime_logs() -> Iterator[None]:
    """onnxruntime's optimizer and quantizer log every fusion and step at INFO on many loggers,
    and the quantizer warns on the root logger, once per call, to "consider pre-processing"
    (not needed here: the issue's measurements): silence WARNING and below while they run."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


@dataclass(frozen=True)
class GraphOptimization:
    """What onnxruntime's transformer optimizer did to the fp32 export, and whether it is used."""

    applied: bool
    speedup: float  # raw export time / optimized time, scoring validation texts
    max_logit_diff: float  # optimized vs raw export on those texts
    fused: dict[str, int]  # fused operator -> count


def optimize_graph(
    raw: Path,
    out: Path,
    num_heads: int,
    hidden_size: int,
    directory: Path,
    texts: Sequence[str],
    max_logit_diff: float,
    min_speedup: float = 1.03,
) -> GraphOptimization:
    """Write to `out` the faster of the raw export and its transformer-optimized graph.

    The optimizer drops the exporter's node metadata but keeps node names, so node groups found
    on the raw export (`node_groups`) address the same MatMul/Gemm nodes in either graph. The
    optimized graph is kept only if it is at least `min_speedup` times faster on `texts` (two
    interleaved rounds) and its logits stay within `max_logit_diff` of the raw export's.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    with quiet_onnxruntime_logs():
        model = optimize_model(
            str(raw), model_type="bert", num_heads=num_heads, hidden_size=hidden_size
        )
        fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
        model.save_model_to_file(str(out))
    engines = {"raw": OnnxPredictor(directory, raw), "optimized": OnnxPredictor(directory, out)}
    seconds = {name: 0.0 for name in engines}
    logits = {}
    for round_ in range(2):
        for name, engine in engines.items():
            logits[name], spent = timed_logits(engine, texts, warm_up=round_ == 0)
            seconds[name] += spent
    diff = float(np.abs(logits["optimized"] - logits["raw"]).max())
    speedup = seconds["raw"] / seconds["optimized"]
    applied = speedup >= min_speedup and diff <= max_logit_diff
    if not applied:
        shutil.copy2(raw, out)
    return GraphOptimization(applied, speedup, diff, fused)


def quantize(fp32: Path, out: Path, per_channel: bool, keep_fp32: Sequence[str] = ()) -> Path:
    """Dynamic int8 (QInt8 weights, activations quantized at run time), nodes in `keep_fp32` left
    in fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_onnxruntime_logs():
        quantize_dynamic(
            str(fp32),
            str(out),
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            # The quantizer first splits a Gemm into `<name>_MatMul` + `<name>_Add`.
            nodes_to_exclude=[n for name in keep_fp32 for n in (name, f"{name}_MatMul")],
        )
    return out


def timed_logits(
    predictor: OnnxPredictor, texts: Sequence[str], warm_up: bool = True
) -> tuple[np.ndarray, float]:
    """Logits of `texts` and the seconds a pass over them took, after an untimed first pass
    (unless the predictor has already scored them). A new session's first pass is 10-30 %
    slower (memory for each new input shape; measured), and by different amounts for different
    graphs: timing it would rank variants by their warm-up."""
    if warm_up:
        predictor.logits(texts)
    started = time.perf_counter()
    logits = predictor.logits(texts)
    return logits, time.perf_counter() - started


@dataclass(frozen=True)
class Latency:
    """Single-text latency (one text per call, as a served request), milliseconds."""

    p50_ms: float
    p95_ms: float


def measure_latency(predictor: OnnxPredictor, texts: Sequence[str], warmup: int = 5) -> Latency:
    for text in texts[:warmup]:
        predictor.logits([text])
    times = []
    for text in texts:
        started = time.perf_counter()
        predictor.logits([text])
        times.append(1000 * (time.perf_counter() - started))
    return Latency(float(np.percentile(times, 50)), float(np.percentile(times, 95)))
