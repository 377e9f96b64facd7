"""The ONNX graph of a fine-tuned classifier: export from PyTorch (traced so that attention
fuses), onnxruntime's transformer optimizer, dynamic int8 quantization (per tensor or per
channel, node groups kept in fp32), the node groups int8 touches, and timing (`timed_logits`,
`measure_latency`). Why: docs/decisions/0005-onnx-export-and-int8-search.md and
docs/decisions/0015-fused-attention-export.md.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flywheel.models.bundle import ClassifierBundle
from flywheel.models.predictor import OnnxPredictor

INPUTS = ("input_ids", "token_type_ids", "attention_mask")


# What dynamic int8 quantizes, by the input holding the constant weight it quantizes: MatMul and
# Gemm weights, the fused Attention's packed query/key/value weights, the embedding tables (a
# Gather's, or the fused EmbedLayerNormalization's word table). A product of two activations
# (attention scores) stays fp32 whatever is asked, so it belongs to no group.
QUANTIZED_INPUT = {
    "MatMul": 1,
    "Gemm": 1,
    "Attention": 1,
    "Gather": 0,
    "EmbedLayerNormalization": 2,
}

ATTENTION = "flywheel_onnx"  # the attention function the export traces (see `export_fp32`)


def _traceable_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Scaled dot-product attention spelt as onnxruntime's transformer optimizer recognises it
    (MatMul, Div, Add mask, Softmax, MatMul), so the export's attention fuses into one
    `Attention` operator (which int8 then runs as `QAttention`). transformers' own eager function
    multiplies by the scale, which the optimizer takes for the mask and so fuses nothing."""
    import torch

    divisor = 1.0 / scaling if scaling else math.sqrt(query.size(-1))
    scores = torch.matmul(query, key.transpose(2, 3)) / divisor
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.nn.functional.softmax(scores, dim=-1)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def export_fp32(bundle: ClassifierBundle, path: Path, opset: int) -> Path:
    """The fine-tuned bundle as a single-file ONNX model with dynamic batch and sequence axes,
    traced so that the transformer optimizer can fuse its attention (measured in
    docs/decisions/0015-fused-attention-export.md): the padding mask is passed as the additive
    (batch, 1, 1, sequence) mask of classic BERT, attention is `_traceable_attention`, and the
    TorchScript exporter is used (the dynamo exporter's graph fuses no attention). The model's
    own attention is restored afterwards."""
    import torch
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _traceable_attention)
    encoded = bundle.encode(["a short text", "a somewhat longer text to give two lengths"])
    sample = bundle.pad([{k: encoded[k][i] for k in encoded} for i in range(2)])
    names = [n for n in INPUTS if n in sample]
    model = bundle.model.eval()
    previous = model.config._attn_implementation
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        model.set_attn_implementation(ATTENTION)
        with warnings.catch_warnings():
            # TorchScript export is deprecated in favour of dynamo, which fuses nothing here;
            # tracing warns that shapes become constants, which the dynamic axes undo.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _with_additive_mask(model, names),
                tuple(sample[n] for n in names),
                str(path),
                input_names=names,
                output_names=["logits"],
                dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names},
                opset_version=opset,
                dynamo=False,
            )
    finally:
        model.set_attn_implementation(previous)
    return path


def _with_additive_mask(model: Any, names: Sequence[str]) -> Any:
    """`model` (a sequence classifier) taking `names` positionally, its padding mask made the
    additive mask of classic BERT (0 where a token is, -10000 where padding is) before the model
    sees it; returns the logits."""
    import torch

    class MaskedClassifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: Any) -> Any:
            kwargs = dict(zip(names, inputs, strict=True))
            mask = kwargs["attention_mask"][:, None, None, :].to(torch.float32)
            kwargs["attention_mask"] = (1.0 - mask) * -10000.0
            return self.model(**kwargs).logits

    return MaskedClassifier()


def node_groups(model_path: Path) -> dict[str, list[str]]:
    """The nodes int8 quantizes (QUANTIZED_INPUT), by the torch module they come from, in graph
    order.

    The exporter names a node after its module's path: `/model/bert/encoder/layer.0/output/
    dense/MatMul` is in group `bert.encoder.layer.0.output.dense`. Operators the transformer
    optimizer fused get new names; their group is their layer: the n-th `Attention` node is
    `bert.encoder.layer.<n>.attention.self` (layers run in order), the `EmbedLayerNormalization`
    node is `bert.embeddings`.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    constants = {t.name for t in model.graph.initializer}
    prefix = _encoder_prefix(model.graph.node)
    groups: dict[str, list[str]] = {}
    attention = 0
    for node in model.graph.node:
        position = QUANTIZED_INPUT.get(node.op_type)
        if position is None or node.input[position] not in constants:
            continue
        if node.op_type == "Attention":
            group = f"{prefix}encoder.layer.{attention}.attention.self"
            attention += 1
        elif node.op_type == "EmbedLayerNormalization":
            group = f"{prefix}embeddings"
        else:
            scopes = node.name.strip("/").split("/")[:-1]
            if scopes[:1] == ["model"]:  # the wrapper's attribute
                scopes = scopes[1:]
            group = ".".join(scopes) or node.name
        groups.setdefault(group, []).append(node.name)
    return groups


def _encoder_prefix(nodes: Sequence[Any]) -> str:
    """`bert.` for a BertForSequenceClassification: the module path before `encoder`."""
    for node in nodes:
        scopes = node.name.strip("/").split("/")
        if "encoder" in scopes:
            head = scopes[: scopes.index("encoder")]
            return "".join(f"{s}." for s in head if s != "model")
    return ""


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
) -> GraphOptimization:
    """Write to `out` the transformer-optimized graph of the raw export, or the raw export if
    the optimized one computes other logits.

    The optimizer fuses attention, layer norms and GELU (new node names) and keeps the names of
    the MatMul/Gemm nodes it leaves, so `node_groups` of `out` names its groups. In fp32 the
    two run alike (onnxruntime applies the same fusions when it loads the raw graph: 0.99x
    measured), but int8 quantizes only what the file holds: the fused graph runs attention as
    QAttention (docs/decisions/0015-fused-attention-export.md). So the optimized graph is kept
    unless its logits on `texts` differ from the raw export's by more than `max_logit_diff`.
    Its speed against the raw graph (two interleaved rounds) is measured and reported, and
    decides nothing: a timing threshold made the graph, and so the int8 search's candidates,
    depend on the machine's load (0.91x one run, under 0.9x the next on the same model).
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
    applied = diff <= max_logit_diff
    if not applied:
        shutil.copy2(raw, out)
    return GraphOptimization(applied, speedup, diff, fused)


def quantize(
    fp32: Path,
    out: Path,
    per_channel: bool,
    keep_fp32: Sequence[str] = (),
    unsigned_weights: bool = False,
) -> Path:
    """Dynamic int8 (QInt8 weights, activations quantized at run time to uint8), nodes in
    `keep_fp32` left in fp32. `unsigned_weights`: QUInt8 weights (u8u8), which CPUs without VNNI
    multiply without the 16-bit saturation of u8s8 but more slowly (benchmarks/inference.py)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_onnxruntime_logs():
        quantize_dynamic(
            str(fp32),
            str(out),
            weight_type=QuantType.QUInt8 if unsigned_weights else QuantType.QInt8,
            per_channel=per_channel,
            # the fused operators (Attention, SkipLayerNormalization) have no type inference in
            # onnx: their outputs are float
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
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
