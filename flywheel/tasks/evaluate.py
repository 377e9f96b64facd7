"""Evaluate: a classifier's test report, and the stage setting the model against the baseline.

Owns the `EvaluationReport`: scores (flywheel.metrics) overall, per class and per slice,
behavioural checks, the worst mistakes, written as JSON beside a confusion matrix and a
reliability diagram. It takes anything with `labels` and `predict_proba(texts)` (the
transformer bundle, the baseline, the ONNX predictor), so every model is measured the same way.
What the checks and slices show on the default data: docs/training.md.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import runtime, tracking
from flywheel.config import Config, ConfigError
from flywheel.io import read_parquet, replace_dir_atomic
from flywheel.metrics import (
    Classifier,
    Metrics,
    SliceMetrics,
    compute_metrics,
    expected_calibration_error,
    metric_name,
    predict_labels,
    slice_metrics,
)
from flywheel.progress import progress
from flywheel.stages import StageSpec
from flywheel.tasks.prepare import PrepareResult

STAGE = StageSpec(
    name="evaluate",
    module=__name__,
    reads=("evaluate", "train.device", "train.precision"),
    upstream=("baseline", "train"),
)

if TYPE_CHECKING:
    from flywheel.tasks.train import TrainResult

log = logging.getLogger(__name__)

WORST = 20  # misclassifications listed, most confident first


@dataclass(frozen=True)
class BehaviourResult:
    """A behavioural test: how many cases kept (invariance) or got (minimum functionality) the
    expected label."""

    name: str
    kind: str  # "invariance" or "minimum functionality"
    cases: int
    failures: int
    min_pass_rate: float
    examples: list[str] = field(default_factory=list)  # a few failing cases

    @property
    def pass_rate(self) -> float:
        return 1 - self.failures / self.cases if self.cases else 1.0

    @property
    def passed(self) -> bool:
        return self.pass_rate >= self.min_pass_rate


@dataclass(frozen=True)
class EvaluationReport:
    model: str
    labels: list[str]
    metrics: Metrics
    slices: list[SliceMetrics]
    worst: list[dict[str, object]]
    behaviour: list[BehaviourResult]
    artifacts: dict[str, str]  # name -> file name, in the report's folder

    def to_dict(self) -> dict:
        out = asdict(self)
        for row, check in zip(out["behaviour"], self.behaviour, strict=True):
            row.update(pass_rate=check.pass_rate, passed=check.passed)
        return out

    def scalars(self, prefix: str = "test_") -> dict[str, float]:
        """Every number as a flat name -> value map (MLflow metrics, run comparisons)."""
        m = self.metrics
        out = {
            f"{prefix}accuracy": m.accuracy,
            f"{prefix}macro_f1": m.macro_f1,
            f"{prefix}weighted_f1": m.weighted_f1,
            f"{prefix}ece": m.ece,
        }
        if m.roc_auc is not None:
            out[f"{prefix}roc_auc"] = m.roc_auc
        for label, scores in m.per_class.items():
            for name in ("precision", "recall", "f1"):
                out[f"{prefix}class.{metric_name(label)}.{name}"] = getattr(scores, name)
        for s in self.slices:
            kind, _, value = s.slice.partition("=")
            key = f"{prefix}slice.{kind}.{metric_name(value)}"
            out[f"{key}.accuracy"] = s.accuracy
            out[f"{key}.macro_f1"] = s.macro_f1
        for check in self.behaviour:
            out[f"behaviour.{metric_name(check.name)}.pass_rate"] = check.pass_rate
        return out


# --- behavioural checks (CheckList-style) -----------------------------------------------------

PLACEHOLDERS = ("<EMAIL>", "<PHONE>", "<URL>", "<IP>")
NAMES = (
    "Tom Hanks",
    "Meryl Streep",
    "Denzel Washington",
    "Priya Sharma",
    "Wei Chen",
    "Olusegun Adeyemi",
)
TEMPLATES_WITH_PII = (
    "I sent my thoughts to {pii}: the film is {adj}.",
    "Contact {pii} for tickets. Honestly, a {adj} two hours.",
    "{pii} asked me what I thought. I said it was {adj}.",
)
TEMPLATES_WITH_NAME = (
    "{name} gives a {adj} performance in this one.",
    "With {name} in the lead, the result is {adj}.",
    "A {adj} film, and {name} knows it.",
)
ADJECTIVES = ("wonderful", "dreadful", "forgettable", "moving", "tedious", "brilliant")
# Minimum functionality: short, unambiguous reviews; `positive`/`negative` map to the labels.
MFT_POSITIVE = (
    "A masterpiece. Funny, moving and beautifully acted.",
    "One of the best films of the year.",
    "I loved every minute of it.",
    "Smart, warm and thoroughly entertaining.",
    "A triumph from start to finish.",
    "Gorgeous to look at and a joy to watch.",
)
MFT_NEGATIVE = (
    "A dull, lifeless mess.",
    "One of the worst films of the year.",
    "I was bored from beginning to end.",
    "Clumsy, tedious and painfully unfunny.",
    "A total waste of two hours.",
    "Ugly to look at and a chore to sit through.",
)


def _invariance(model: Classifier, name: str, groups: list[list[str]], min_rate: float):
    """Each group holds variants that must all get the same label."""
    flat = [text for group in groups for text in group]
    predicted = predict_labels(model, flat)
    failures, examples, i = 0, [], 0
    for group in groups:
        got = predicted[i : i + len(group)]
        i += len(group)
        if len(set(got)) > 1:
            failures += 1
            if len(examples) < 3:
                examples.append(
                    " | ".join(f"{t!r} -> {g}" for t, g in zip(group, got, strict=True))
                )
    return BehaviourResult(name, "invariance", len(groups), failures, min_rate, examples)


def behavioural_checks(
    model: Classifier, positive: str | None, negative: str | None, min_pass_rate: float = 0.9
) -> list[BehaviourResult]:
    """Invariance to PII placeholders and to names; minimum functionality where the positive and
    negative labels are known (sentiment-like data)."""
    pii_groups = [
        [t.format(pii=p, adj=a) for p in PLACEHOLDERS]
        for t in TEMPLATES_WITH_PII
        for a in ADJECTIVES
    ]
    name_groups = [
        [t.format(name=n, adj=a) for n in NAMES] for t in TEMPLATES_WITH_NAME for a in ADJECTIVES
    ]
    checks = [
        _invariance(model, "swap PII placeholder", pii_groups, min_pass_rate),
        _invariance(model, "swap person name", name_groups, min_pass_rate),
    ]
    if positive is not None and negative is not None:
        texts = list(MFT_POSITIVE) + list(MFT_NEGATIVE)
        expected = [positive] * len(MFT_POSITIVE) + [negative] * len(MFT_NEGATIVE)
        got = predict_labels(model, texts)
        wrong = [
            f"{t!r} -> {g} (expected {e})"
            for t, g, e in zip(texts, got, expected, strict=True)
            if g != e
        ]
        checks.append(
            BehaviourResult(
                "clear-cut reviews",
                "minimum functionality",
                len(texts),
                len(wrong),
                min_pass_rate,
                wrong[:3],
            )
        )
    return checks


# --- the stage --------------------------------------------------------------------------------


def evaluate(
    model: Classifier,
    test_frame: pd.DataFrame,
    out_dir: Path,
    name: str,
    positive: str | None = None,
    negative: str | None = None,
    min_pass_rate: float = 0.9,
    batch_size: int = 64,
) -> EvaluationReport:
    """Score `model` on the test split and write report.json, confusion.png, reliability.png
    into `out_dir`."""
    labels = model.labels
    proba = scored(model, test_frame["text"].tolist(), batch_size, f"evaluate {name}")
    metrics = compute_metrics(test_frame["label"].tolist(), proba, labels)
    predicted = np.asarray(labels)[proba.argmax(axis=1)]
    wrong = test_frame.assign(predicted=predicted, confidence=proba.max(axis=1))
    wrong = wrong[wrong["predicted"] != wrong["label"]].sort_values("confidence", ascending=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts = {
        "report": "report.json",
        "confusion": "confusion.png",
        "reliability": "reliability.png",
    }
    report = EvaluationReport(
        model=name,
        labels=labels,
        metrics=metrics,
        slices=slice_metrics(test_frame, proba, labels),
        worst=[
            {
                "text": r.text,
                "label": r.label,
                "predicted": r.predicted,
                "confidence": round(float(r.confidence), 4),
                "source": r.source,
            }
            for r in wrong.head(WORST).itertuples()
        ],
        behaviour=behavioural_checks(model, positive, negative, min_pass_rate),
        artifacts=artifacts,
    )
    _plot_confusion(metrics.confusion, labels, out_dir / artifacts["confusion"], name)
    _plot_reliability(
        proba.max(axis=1),
        predicted == test_frame["label"].to_numpy(),
        out_dir / artifacts["reliability"],
        name,
    )
    (out_dir / artifacts["report"]).write_text(
        json.dumps(report.to_dict(), indent=2) + "\n", "utf-8"
    )
    return report


def scored(model: Classifier, texts: list[str], batch_size: int, description: str) -> np.ndarray:
    """`model.predict_proba(texts, batch_size)`. The transformer (tens of seconds on a CPU for
    the default test split) goes a batch at a time under a progress bar: it scores its batches
    one by one in input order, so the result is the same. The others run in one call: the
    baseline takes a second, and the ONNX predictor batches texts of similar length together
    (the batches of a part would differ)."""
    from flywheel.models.bundle import ClassifierBundle

    if not isinstance(model, ClassifierBundle) or not texts:
        return model.predict_proba(texts, batch_size)
    parts = []
    every = math.ceil(len(texts) / 5)  # off a terminal: a line per fifth
    with progress(description, len(texts), unit="text", every=every, logger=log) as bar:
        for start in range(0, len(texts), batch_size):
            parts.append(model.predict_proba(texts[start : start + batch_size], batch_size))
            bar.advance(len(parts[-1]))
    return np.concatenate(parts)


def _plot_confusion(confusion: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.array(confusion)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.2 * len(labels) + 2))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}: confusion matrix")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(count),
            ha="center",
            va="center",
            color="white" if count > matrix.max() / 2 else "black",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_reliability(confidence: np.ndarray, correct: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(0, 1, 11)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, 9)
    centres = (edges[:-1] + edges[1:]) / 2
    accuracy = [correct[which == b].mean() if (which == b).any() else np.nan for b in range(10)]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.bar(centres, accuracy, width=0.09, alpha=0.8, label="accuracy per bin")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(
        f"{title}: reliability (ECE {expected_calibration_error(confidence, correct):.3f})"
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- in the pipeline ----------------------------------------------------------------------------


def check_polarity_labels(cfg: Config, labels: Sequence[str]) -> None:
    """evaluate.positive_label/negative_label must be labels of the data (checked before any
    model is fitted, so a typo costs seconds, not a training run)."""
    ec = cfg.evaluate
    for key, label in (("positive", ec.positive_label), ("negative", ec.negative_label)):
        if label is not None and label not in labels:
            raise ConfigError(
                f"evaluate.{key}_label {label!r} is not a label of the data "
                f"({', '.join(labels)}): set evaluate.positive_label/negative_label to two of "
                "them, or both to null"
            )


def evaluate_model(
    cfg: Config, model: Classifier, test_frame: pd.DataFrame, name: str
) -> tuple[EvaluationReport, Path]:
    """Score one of the pipeline's models on the test split into `<evaluate.report_dir>/<name>/`
    (replaced whole); returns the report and its folder."""
    ec = cfg.evaluate
    check_polarity_labels(cfg, model.labels)
    folder = cfg.resolve(ec.report_dir) / name
    report = replace_dir_atomic(
        folder,
        lambda staging: evaluate(
            model,
            test_frame,
            staging,
            name,
            ec.positive_label,
            ec.negative_label,
            ec.min_behaviour_pass_rate,
            ec.batch_size,
        ),
    )
    return report, folder


class ScoredBaseline(Protocol):
    """What this stage reads of the baseline stage's result (tasks/baseline.BaselineReport):
    named by shape, because the baseline stage imports this module to score itself."""

    @property
    def evaluation(self) -> EvaluationReport: ...


@dataclass(frozen=True)
class EvaluateResult:
    """The fine-tuned model's test report, set against the baseline's."""

    report: EvaluationReport
    report_dir: Path
    baseline: EvaluationReport
    run_id: str

    @property
    def accuracy_gain(self) -> float:
        """Test accuracy of the model minus the baseline's (a fraction; x100 for points)."""
        return self.report.metrics.accuracy - self.baseline.metrics.accuracy

    @property
    def macro_f1_gain(self) -> float:
        return self.report.metrics.macro_f1 - self.baseline.metrics.macro_f1


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(
    cfg: Config,
    prepared: PrepareResult,
    trained: TrainResult,
    baseline: ScoredBaseline,
    parent: tracking.RunRef,
) -> EvaluateResult:
    """Evaluate the best checkpoint on the test split; log the report beside the baseline's."""
    from flywheel.models.bundle import ClassifierBundle

    test = read_parquet(prepared.split_paths["test"])
    with tracking.stage_run(cfg, "evaluate", parent) as run:
        tracking.log_dataset(run, test, prepared.split_paths["test"], "test")
        bundle = ClassifierBundle.load(trained.model_dir)
        bundle.model.to(runtime.select_device(cfg.train.device, cfg.train.precision).type)
        report, folder = evaluate_model(cfg, bundle, test, "model")
        result = EvaluateResult(report, folder, baseline.evaluation, run.run_id)
        comparison = {
            "baseline_test_accuracy": baseline.evaluation.metrics.accuracy,
            "baseline_test_macro_f1": baseline.evaluation.metrics.macro_f1,
            "accuracy_gain_vs_baseline": result.accuracy_gain,
            "macro_f1_gain_vs_baseline": result.macro_f1_gain,
        }
        scalars = report.scalars()
        tracking.log_scalars(run, {**scalars, **comparison})
        tracking.log_artifacts(run, folder)
    headline = {
        k: v
        for k, v in scalars.items()
        if not k.startswith(("test_slice.", "test_class.", "behaviour."))
    }
    tracking.log_scalars(
        parent,
        {
            **headline,
            **comparison,
            "train_seconds": trained.seconds,
            "best_val_macro_f1": trained.best_val_macro_f1,
        },
    )
    return result
