"""Export: the fine-tuned model to ONNX fp32, then to int8 where int8 keeps parity.

Owns the fp32 export (dynamo exporter; onnxruntime's transformer optimizer where it is faster
and computes the same logits; parity with PyTorch on the test split), the int8 search on the
validation split (node groups kept in fp32 by sensitivity), the gate of a variant against fp32,
and the choice of the model to ship. Why, and the measurements behind the bounds:
docs/decisions/0005.
"""

from __future__ import annotations

import ast
import logging
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import tracking
from flywheel.config import Config, ExportConfig
from flywheel.errors import FlywheelError
from flywheel.io import read_parquet, replace_dir_atomic, write_json
from flywheel.metrics import MetricInputError, label_ids, label_scores
from flywheel.models import profile
from flywheel.models.bundle import ClassifierBundle
from flywheel.models.predictor import MODEL_FILE, OnnxPredictor
from flywheel.slices import slice_masks
from flywheel.stages import StageSpec
from flywheel.tasks.prepare import PrepareResult
from flywheel.tasks.train import TrainResult

STAGE = StageSpec(
    name="export",
    module=__name__,
    reads=("export", "monitor.reference"),
    upstream=("train",),
    artifacts=("directory",),
)

log = logging.getLogger(__name__)

INPUTS = ("input_ids", "token_type_ids", "attention_mask")
# What dynamic int8 quantizes, by the input holding the constant it quantizes: MatMul and Gemm
# weights, Gather tables (the embeddings). A product of two activations (attention scores) stays
# fp32 whatever is asked, so it belongs to no group.
QUANTIZED_INPUT = {"MatMul": 1, "Gemm": 1, "Gather": 0}


@dataclass(frozen=True)
class GateBounds:
    """What an int8 variant must keep, relative to the fp32 model on the same texts."""

    min_agreement: float = 0.985  # share of texts with the same label
    max_metric_loss: float = 0.005  # accuracy and macro-F1, as fractions (0.005 = 0.5 points)
    # Smaller slices are reported, not judged: with ~1.5 % of labels changing, the loss of a
    # slice of a few hundred rows varies by more than 0.5 points by chance alone.
    min_slice_rows: int = 500

    @classmethod
    def of(cls, ec: ExportConfig) -> GateBounds:
        """The bounds set in the `export` section of the config."""
        return cls(ec.min_agreement, ec.max_metric_loss, ec.min_slice_rows)


@dataclass(frozen=True)
class Parity:
    """One variant against fp32 on one set of texts."""

    variant: str
    rows: int
    agreement: float
    accuracy_loss: float
    macro_f1_loss: float
    slices: dict[str, dict[str, float]]  # slice -> agreement, accuracy_loss, macro_f1_loss, rows
    failures: list[str]  # why the gate failed; empty when it passed
    worst: list[dict[str, object]] = field(default_factory=list)  # disagreements, largest first

    @property
    def passed(self) -> bool:
        return not self.failures


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


def compare(
    variant: str,
    reference: np.ndarray,
    candidate: np.ndarray,
    frame: pd.DataFrame,
    labels: Sequence[str],
    bounds: GateBounds,
    worst: int = 10,
) -> Parity:
    """Gate one variant against fp32 on the rows of `frame` (text, label, source).

    Takes the two models' logits, one row per row of `frame`, one column per label: the gate
    judges their labels (the argmax, so no probabilities are needed: accuracy and macro-F1 from
    class ids), and the examples show the largest logit change."""
    expected = (len(frame), len(labels))
    if reference.shape != expected or candidate.shape != expected:
        raise MetricInputError(
            f"logits of shapes {reference.shape} (fp32) and {candidate.shape} ({variant}), "
            f"expected {expected}: one row per text, one column per label"
        )
    truth = label_ids(frame["label"].tolist(), labels)
    before, after = reference.argmax(axis=1), candidate.argmax(axis=1)
    same = before == after

    def losses(members: np.ndarray) -> tuple[float, float]:
        accuracy, f1 = label_scores(truth[members], before[members], len(labels))
        accuracy_after, f1_after = label_scores(truth[members], after[members], len(labels))
        return accuracy - accuracy_after, f1 - f1_after

    accuracy_loss, f1_loss = losses(np.ones(len(frame), dtype=bool))
    failures = _failures("overall", float(same.mean()), accuracy_loss, f1_loss, bounds)
    slices = {}
    for name, members in slice_masks(frame).items():
        acc_l, f1_l = losses(members)
        agreement = float(same[members].mean())
        slices[name] = {
            "rows": int(members.sum()),
            "agreement": agreement,
            "accuracy_loss": acc_l,
            "macro_f1_loss": f1_l,
        }
        if members.sum() >= bounds.min_slice_rows:
            failures += _failures(name, agreement, acc_l, f1_l, bounds)
    examples = _changed_labels(variant, reference, candidate, frame, labels, truth)[:worst]
    return Parity(
        variant, len(frame), float(same.mean()), accuracy_loss, f1_loss, slices, failures, examples
    )


def _changed_labels(
    variant: str,
    reference: np.ndarray,
    candidate: np.ndarray,
    frame: pd.DataFrame,
    labels: Sequence[str],
    truth: np.ndarray,
) -> list[dict[str, object]]:
    """The texts whose label the variant changes, largest logit change first."""
    before, after = reference.argmax(axis=1), candidate.argmax(axis=1)
    flips = np.flatnonzero(before != after)
    margin = np.abs(candidate - reference).max(axis=1)
    return [
        {
            "text": frame["text"].iloc[i],
            "label": labels[truth[i]],
            "fp32": labels[int(before[i])],
            variant: labels[int(after[i])],
            "max_logit_change": round(float(margin[i]), 4),
        }
        for i in flips[np.argsort(-margin[flips])]
    ]


TOLERANCE = 1e-9  # a loss of exactly the bound passes, whatever the float rounding


def _failures(
    where: str, agreement: float, accuracy_loss: float, f1_loss: float, bounds: GateBounds
) -> list[str]:
    out = []
    if agreement < bounds.min_agreement - TOLERANCE:
        out.append(f"{where}: label agreement {agreement:.2%} < {bounds.min_agreement:.2%}")
    if accuracy_loss > bounds.max_metric_loss + TOLERANCE:
        out.append(
            f"{where}: accuracy loss {100 * accuracy_loss:.2f} pts > "
            f"{100 * bounds.max_metric_loss:.2f}"
        )
    if f1_loss > bounds.max_metric_loss + TOLERANCE:
        out.append(
            f"{where}: macro-F1 loss {100 * f1_loss:.2f} pts > {100 * bounds.max_metric_loss:.2f}"
        )
    return out


def sensitivity(
    fp32: Path,
    directory: Path,
    groups: dict[str, list[str]],
    texts: Sequence[str],
    reference: np.ndarray,
    work: Path,
) -> dict[str, float]:
    """How much quantizing one group alone (per-tensor int8, every other group of `groups` in
    fp32) moves the logits of `texts`: mean |logit - fp32 logit|."""
    out = {}
    everything = [n for nodes in groups.values() for n in nodes]
    for group, nodes in groups.items():
        others = [n for n in everything if n not in set(nodes)]
        path = quantize(fp32, work / "probe.onnx", per_channel=False, keep_fp32=others)
        logits = OnnxPredictor(directory, path).logits(texts)
        out[group] = float(np.abs(logits - reference).mean())
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
class Variant:
    """One int8 candidate of the search, judged on the validation split."""

    name: str
    per_channel: bool
    keep_fp32: tuple[str, ...]  # node groups left in fp32, most sensitive first
    path: Path
    val: Parity
    seconds: float  # time to score the validation split (lower is faster)


def search(
    fp32: Path,
    groups: dict[str, list[str]],
    directory: Path,
    val_frame: pd.DataFrame,
    bounds: GateBounds,
    sensitivity_rows: int,
    max_fp32_groups: int,
    work: Path,
) -> tuple[list[Variant], float, dict[str, float]]:
    """Int8 candidates of `fp32` on the validation split: per scheme (per-tensor, per-channel
    weights), the fewest most-sensitive node groups kept in fp32 that pass the gate (or
    `max_fp32_groups`). Returns the candidates, the fp32 scoring time and each group's
    sensitivity."""
    texts = val_frame["text"].tolist()
    fp32_predictor = OnnxPredictor(directory, fp32)
    labels = fp32_predictor.labels
    reference, fp32_seconds = timed_logits(fp32_predictor, texts)
    scores: dict[str, float] = {}
    if max_fp32_groups:  # ranking only matters when groups may be kept in fp32
        probe = val_frame.head(sensitivity_rows)["text"].tolist()
        scores = sensitivity(fp32, directory, groups, probe, reference[: len(probe)], work)
    ranked = sorted(groups, key=lambda g: -scores.get(g, 0.0))
    log.info("export: %d node groups; most sensitive: %s", len(groups), ", ".join(ranked[:3]))
    candidates = []
    for per_channel in (False, True):
        scheme = "int8-per-channel" if per_channel else "int8"
        for k in range(min(max_fp32_groups, len(ranked)) + 1):
            keep = tuple(ranked[:k])
            name = f"{scheme}-fp32x{k}" if k else scheme
            nodes = [n for g in keep for n in groups[g]]
            path = quantize(fp32, work / f"{name}.onnx", per_channel, nodes)
            logits, seconds = timed_logits(OnnxPredictor(directory, path), texts)
            parity = compare(name, reference, logits, val_frame, labels, bounds)
            candidates.append(Variant(name, per_channel, keep, path, parity, seconds))
            log.info(
                "export: %s on val: agreement %.2f%%, accuracy loss %.2f pts, %.2fx fp32 speed%s",
                name,
                100 * parity.agreement,
                100 * parity.accuracy_loss,
                fp32_seconds / seconds,
                "" if parity.passed else " (fails)",
            )
            if parity.passed:
                break
    return candidates, fp32_seconds, scores


def to_gate(
    candidates: Sequence[Variant], fp32_seconds: float, min_speedup: float
) -> list[Variant]:
    """The candidates worth gating on the test split, fastest first: those that pass the gate
    on val and score val at least `min_speedup` times as fast as fp32."""
    passed = [c for c in candidates if c.val.passed]
    faster = [c for c in passed if fp32_seconds / c.seconds >= min_speedup]
    return sorted(faster, key=lambda c: c.seconds)


def choose(
    candidates: Sequence[Variant],
    on_test: Mapping[str, Parity],
    fp32_seconds: float,
    min_speedup: float,
) -> tuple[Variant | None, Parity | None, list[str]]:
    """The int8 variant to ship, its parity on the test split, and why the others are not.

    A pure function of measured figures: each candidate's val parity and val scoring time,
    fp32's time, and `on_test`, the test parity of each candidate `to_gate` names. The first
    of `to_gate` (the fastest) whose test parity passes is chosen; one failing test makes the
    next fastest be taken. None passing: (None, None, reasons), the first val failure of each
    candidate first (the fp32 model is the export)."""
    gated = to_gate(candidates, fp32_seconds, min_speedup)
    reasons = [
        f"{c.name} passes val at {fp32_seconds / c.seconds:.2f}x fp32 speed "
        f"(export.min_int8_speedup {min_speedup:g})"
        for c in candidates
        if c.val.passed and c not in gated
    ]
    for variant in gated:
        parity = on_test[variant.name]
        if parity.passed:
            return variant, parity, reasons
        reasons += [f"{variant.name} on test: {f}" for f in parity.failures]
    failed_val = [f"{c.name} on val: {c.val.failures[0]}" for c in candidates if c.val.failures]
    return None, None, failed_val + reasons


MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "trainer_state.pt", "checkpoint.json")


def copy_preprocessing(bundle_dir: Path, out_dir: Path) -> None:
    """Everything of the bundle but its PyTorch weights and training state: tokenizer files,
    config.json (label map) and flywheel.json, so the export folder stands on its own."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in bundle_dir.iterdir():
        if item.is_file() and item.name not in MODEL_FILES and not item.name.startswith("."):
            shutil.copy2(item, out_dir / item.name)


class ExportParityError(FlywheelError):
    """The ONNX graph does not compute what the PyTorch model computes: nothing to register."""


@dataclass(frozen=True)
class Latency:
    """Single-text latency (one text per call, as a served request), milliseconds."""

    p50_ms: float
    p95_ms: float


@dataclass(frozen=True)
class ExportResult:
    """The export folder and how its model was chosen."""

    directory: Path  # model.onnx (the chosen model), fp32.onnx, tokenizer, flywheel.json
    chosen: str  # "fp32" or the int8 variant's name
    graph: GraphOptimization  # the transformer optimizer on the fp32 export
    fp32_max_logit_diff: float  # onnxruntime fp32 vs PyTorch on the test split
    test: Parity | None  # the chosen int8 variant vs fp32 on the test split (None: fp32 chosen)
    candidates: list[Variant]  # the search on the validation split, with paths dropped
    speedup: float  # fp32 time / chosen time, scoring the validation split
    latency: Latency  # of the chosen model
    fp32_latency: Latency
    reasons: list[str]  # variants rejected on test; with fp32 chosen, why each val candidate failed
    sensitivity: dict[str, float]  # node group -> mean |logit change| alone in int8

    @property
    def parity_passed(self) -> bool:
        """The chosen model passed its parity gate: int8 vs fp32 on test, or (fp32 chosen) the
        fp32 check against PyTorch, which stops the export when it fails."""
        return self.test.passed if self.test is not None else True

    def to_dict(self) -> dict:
        """parity.json: everything but where the folder is."""
        out = asdict(self)
        out.pop("directory")
        for row in out["candidates"]:
            row["path"] = str(row["path"])
        return out


def measure_latency(predictor: OnnxPredictor, texts: Sequence[str], warmup: int = 5) -> Latency:
    for text in texts[:warmup]:
        predictor.logits([text])
    times = []
    for text in texts:
        started = time.perf_counter()
        predictor.logits([text])
        times.append(1000 * (time.perf_counter() - started))
    return Latency(float(np.percentile(times, 50)), float(np.percentile(times, 95)))


def write_reference(
    cfg: Config,
    directory: Path,
    predictor: OnnxPredictor,
    train_frame: pd.DataFrame,
    texts: Sequence[str],
) -> None:
    """The reference profile of the chosen model: its answers on the (test) texts, the
    training split's labels and vocabulary."""
    rc = cfg.monitor.reference
    built, vocabulary = profile.build(
        train_frame["text"].tolist(),
        train_frame["label"].tolist(),
        [predictor.preprocessing.normalise(t) for t in texts],
        predictor.predict_proba(texts),
        predictor.labels,
        rc.bins,
        rc.vocabulary_size,
    )
    profile.save(directory, built, vocabulary)


def export(
    cfg: Config,
    bundle_dir: Path,
    val_frame: pd.DataFrame,
    test_frame: pd.DataFrame,
    train: pd.DataFrame,
) -> ExportResult:
    """Export the fine-tuned bundle to `<bundle run>/onnx/` (replaced whole): fp32 with its
    parity check, the int8 search on val, the gate on test; model.onnx is the chosen model,
    saved with its reference profile (models/profile.py) for drift monitoring."""
    target = bundle_dir.parent / "onnx"
    result = replace_dir_atomic(
        target, lambda staging: _fill(cfg, bundle_dir, staging, val_frame, test_frame, train)
    )
    return replace(result, directory=target)


def _fill(
    cfg: Config,
    bundle_dir: Path,
    staging: Path,
    val_frame: pd.DataFrame,
    test_frame: pd.DataFrame,
    train: pd.DataFrame,
) -> ExportResult:
    """The export folder, written into `staging`."""
    ec = cfg.export
    bounds = GateBounds.of(ec)
    copy_preprocessing(bundle_dir, staging)
    bundle = ClassifierBundle.load(bundle_dir)
    work = staging / "search"
    work.mkdir()
    texts = test_frame["text"].tolist()

    # fp32: export, graph optimization, parity with PyTorch on test (a failure stops here)
    fp32 = staging / "fp32.onnx"
    groups, graph = export_optimized(bundle, work, fp32, staging, val_frame["text"].tolist(), ec)
    fp32_predictor = OnnxPredictor(staging, fp32)
    labels = fp32_predictor.labels
    reference, diff = check_fp32_parity(fp32_predictor, bundle, texts, ec.max_logit_diff)

    # int8: candidates on val, the fast ones gated on test, the choice
    candidates, fp32_seconds, scores = search(
        fp32, groups, staging, val_frame, bounds, ec.sensitivity_rows, ec.max_fp32_groups, work
    )
    on_test = {}
    for c in to_gate(candidates, fp32_seconds, ec.min_int8_speedup):
        logits = OnnxPredictor(staging, c.path).logits(texts)
        on_test[c.name] = compare(c.name, reference, logits, test_frame, labels, bounds)
    chosen, test_parity, reasons = choose(candidates, on_test, fp32_seconds, ec.min_int8_speedup)

    # the folder: model.onnx (the chosen model), its reference profile, parity.json
    shutil.copy2(chosen.path if chosen else fp32, staging / MODEL_FILE)
    shutil.rmtree(work)
    chosen_predictor = OnnxPredictor(staging)
    write_reference(cfg, staging, chosen_predictor, train, texts)
    sample = texts[: ec.latency_texts]
    result = ExportResult(
        directory=staging,
        chosen=chosen.name if chosen else "fp32",
        graph=graph,
        fp32_max_logit_diff=diff,
        test=test_parity,
        candidates=[replace(c, path=Path(c.path.name)) for c in candidates],
        speedup=fp32_seconds / chosen.seconds if chosen else 1.0,
        latency=measure_latency(chosen_predictor, sample),
        fp32_latency=measure_latency(fp32_predictor, sample),
        reasons=reasons,
        sensitivity=scores,
    )
    write_json(staging / "parity.json", result.to_dict())
    return result


def export_optimized(
    bundle: ClassifierBundle,
    work: Path,
    fp32: Path,
    directory: Path,
    val_texts: Sequence[str],
    ec: ExportConfig,
) -> tuple[dict[str, list[str]], GraphOptimization]:
    """The bundle as ONNX at `fp32`: the raw export (written in `work`), transformer-optimized
    where that is faster and computes the same logits (optimize_graph). Returns the raw
    export's node groups, and what the optimizer did."""
    raw = export_fp32(bundle, work / "export.onnx", ec.opset)
    groups = node_groups(raw)  # from the exporter's metadata, which the optimizer drops
    config = bundle.model.config
    graph = optimize_graph(
        raw,
        fp32,
        config.num_attention_heads,
        config.hidden_size,
        directory,
        val_texts,
        ec.max_logit_diff,
    )
    log.info(
        "export: transformer optimizer fused %s; %.2fx speed, %s",
        ", ".join(f"{v} {k}" for k, v in graph.fused.items()) or "nothing",
        graph.speedup,
        "used" if graph.applied else "not used",
    )
    return groups, graph


def check_fp32_parity(
    predictor: OnnxPredictor, bundle: ClassifierBundle, texts: Sequence[str], bound: float
) -> tuple[np.ndarray, float]:
    """The ONNX fp32 logits of `texts` and their largest |difference| from PyTorch's; an
    ExportParityError when that exceeds `bound` (export.max_logit_diff): the export is wrong."""
    reference = predictor.logits(texts)
    diff = float(np.abs(reference - bundle.logits(texts)).max())
    if diff > bound:
        raise ExportParityError(
            f"ONNX fp32 logits differ from PyTorch by up to {diff:.2e} on the test split "
            f"(bound export.max_logit_diff = {bound:.0e}): the export is wrong"
        )
    log.info("export: fp32 ONNX vs PyTorch max |logit difference| %.2e", diff)
    return reference, diff


@task(name="export", cache_policy=NO_CACHE)
def export_task(
    cfg: Config, prepared: PrepareResult, trained: TrainResult, parent: tracking.RunRef
) -> ExportResult:
    """Export, search and gate; tracked as the `export` run (figures, parity.json)."""
    paths = prepared.split_paths
    val, test = read_parquet(paths["val"]), read_parquet(paths["test"])
    train = read_parquet(paths["train"])
    with tracking.stage_run(cfg, "export", parent) as run:
        result = export(cfg, trained.model_dir, val, test, train)
        figures = {
            "fp32_max_logit_diff": result.fp32_max_logit_diff,
            "graph_optimizer_speedup": result.graph.speedup,
            "graph_optimizer_applied": float(result.graph.applied),
            "speedup_vs_fp32": result.speedup,
            "latency_p50_ms": result.latency.p50_ms,
            "latency_p95_ms": result.latency.p95_ms,
            "fp32_latency_p95_ms": result.fp32_latency.p95_ms,
            "int8_candidates": len(result.candidates),
        }
        if result.test is not None:
            figures |= {
                "test_agreement": result.test.agreement,
                "test_accuracy_loss": result.test.accuracy_loss,
                "test_macro_f1_loss": result.test.macro_f1_loss,
            }
        tracking.log_scalars(run, figures)
        tracking.set_tags(run, {"flywheel.export.chosen": result.chosen})
        tracking.log_artifacts(run, result.directory / "parity.json")
    return result
