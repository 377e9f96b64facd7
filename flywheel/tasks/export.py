"""Export stage: the fine-tuned model to ONNX fp32 (parity with PyTorch on the test split), then
the int8 variant the search chooses (flywheel/models/int8.py) where it keeps parity, with the
reference profile for drift. Why: docs/decisions/0005-onnx-export-and-int8-search.md.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import tracking
from flywheel.config import Config, ExportConfig
from flywheel.errors import FlywheelError
from flywheel.io import read_parquet, replace_dir_atomic, write_json
from flywheel.models import profile
from flywheel.models.bundle import ClassifierBundle
from flywheel.models.graph import (
    GraphOptimization,
    Latency,
    export_fp32,
    measure_latency,
    node_groups,
    optimize_graph,
)
from flywheel.models.int8 import (
    GateBounds,
    Parity,
    Variant,
    choose,
    compare,
    search,
    speedups,
)
from flywheel.models.predictor import MODEL_FILE, OnnxPredictor
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
SPEED_TEXTS = 512  # validation texts an int8 candidate and fp32 are timed on (best of 2)


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
class ExportResult:
    """The export folder and how its model was chosen."""

    directory: Path  # model.onnx (the chosen model), fp32.onnx, tokenizer, flywheel.json
    chosen: str  # "fp32" or the int8 variant's name
    graph: GraphOptimization  # the transformer optimizer on the fp32 export
    fp32_max_logit_diff: float  # onnxruntime fp32 vs PyTorch on the test split
    test: Parity | None  # the chosen int8 variant vs fp32 on the test split (None: fp32 chosen)
    candidates: list[Variant]  # the search on the validation split, with paths dropped
    speedups: dict[str, float]  # fp32 time / variant time, for the candidates the search timed
    speedup: float  # fp32 time / chosen time, scoring the first SPEED_TEXTS validation texts
    latency: Latency  # of the chosen model
    fp32_latency: Latency
    reasons: list[str]  # variants rejected on test; with fp32 chosen, why each val candidate failed
    sensitivity: dict[str, dict[str, float]]  # scheme -> node group -> int8 margin change

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

    # int8: candidates on val; those passing, gated on test and (passing) timed; the choice
    val_texts = val_frame["text"].tolist()
    speed: dict[str, float] = {}
    on_test: dict[str, Parity] = {}

    def accept(candidate: Variant) -> bool:  # the test gate, then (if it passes) the timing
        logits = OnnxPredictor(staging, candidate.path).logits(texts)
        parity = compare(candidate.name, reference, logits, test_frame, labels, bounds)
        on_test[candidate.name] = parity
        if not parity.passed:
            return False
        speed.update(speedups(fp32, [candidate], staging, val_texts[:SPEED_TEXTS]))
        return speed[candidate.name] >= ec.min_int8_speedup

    candidates, scores = search(
        bundle,
        fp32,
        groups,
        staging,
        val_frame,
        bounds,
        ec.sensitivity_rows,
        ec.max_fp32_groups,
        work,
        accept,
    )
    chosen, test_parity, reasons = choose(candidates, on_test, speed, ec.min_int8_speedup)

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
        speedups=speed,
        speedup=speed[chosen.name] if chosen else 1.0,
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
    unless that computes other logits on up to 256 validation texts (optimize_graph; its speed
    is measured, not a condition). Returns the node groups of that graph, and what the
    optimizer did."""
    raw = export_fp32(bundle, work / "export.onnx", ec.opset)
    config = bundle.model.config
    graph = optimize_graph(
        raw,
        fp32,
        config.num_attention_heads,
        config.hidden_size,
        directory,
        val_texts[:256],
        ec.max_logit_diff,
    )
    groups = node_groups(fp32)
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
