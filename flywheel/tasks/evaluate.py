"""Evaluate: score a classifier on the test split, overall, per class, per slice and by behaviour.

Works on anything with `labels` and `predict_proba(texts)` (the transformer bundle, the
baseline, later the ONNX predictor), so every model is measured the same way. The result is one
typed `EvaluationReport`, written as JSON beside a confusion matrix and a reliability diagram.
"""

from __future__ import annotations

import hashlib
import json
import re
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
from flywheel.errors import FlywheelError
from flywheel.io import read_parquet, replace_dir_atomic
from flywheel.slices import slice_masks
from flywheel.tasks.prepare import PrepareResult

if TYPE_CHECKING:
    from flywheel.tasks.baseline import BaselineReport
    from flywheel.tasks.train import TrainResult

MIN_SLICE_ROWS = 30  # smaller slices are reported but not judged
WORST = 20  # misclassifications listed, most confident first


class Classifier(Protocol):
    @property
    def labels(self) -> list[str]: ...

    def predict_proba(self, texts: Sequence[str], batch_size: int = ...) -> np.ndarray: ...


@dataclass(frozen=True)
class ClassMetrics:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class Metrics:
    """Scores of one set of predictions."""

    rows: int
    accuracy: float
    macro_f1: float
    weighted_f1: float
    roc_auc: float | None  # None when a class is missing from the truth
    ece: float
    per_class: dict[str, ClassMetrics]
    confusion: list[list[int]]  # rows: true label, columns: predicted, in `labels` order


@dataclass(frozen=True)
class SliceMetrics:
    slice: str  # e.g. "source=feedback", "length=60-139"
    rows: int
    accuracy: float
    macro_f1: float
    judged: bool  # rows >= MIN_SLICE_ROWS


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


def metric_name(text: str, limit: int = 80) -> str:
    """One component of a metric name (a label, a source): characters MLflow accepts, no '/'
    (MLflow reads names as paths), at most `limit` characters (long ones end in a hash)."""
    safe = re.sub(r"[^\w.\- ]", "_", text)
    if len(safe) > limit:
        safe = safe[: limit - 9] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return safe


def predict_labels(model: Classifier, texts: Sequence[str]) -> np.ndarray:
    """The most probable label of each text."""
    return np.asarray(model.labels)[model.predict_proba(texts).argmax(axis=1)]


# The metrics below say what they take, and check it: a model's raw scores (logits) handed to a
# metric of probabilities would otherwise fail deep inside scikit-learn (multi-class ROC-AUC),
# or worse, give a wrong calibration error without failing at all.

# scikit-learn's own tolerance for "each row sums to 1" (multi-class ROC-AUC, np.allclose's
# defaults): what passes here passes there.
PROBABILITY_TOLERANCE = 1e-5


class MetricInputError(FlywheelError, ValueError):
    """Scores or labels handed to a metric are not what it takes (probabilities, shape, labels)."""


def label_ids(y_true: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Takes label names: the position of each in `labels` (the model's label order)."""
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({str(y) for y in y_true if y not in index})
    if unknown:
        raise MetricInputError(
            f"true labels {unknown} are not labels of the model ({', '.join(labels)}): "
            "score a model on data with the labels it was trained on"
        )
    return np.array([index[y] for y in y_true], dtype=int)


def check_probabilities(proba: np.ndarray, rows: int, labels: Sequence[str]) -> np.ndarray:
    """`proba` as floats if it holds probabilities: `rows` rows (texts) by one column per label,
    no negative value, each row summing to 1 (within PROBABILITY_TOLERANCE); else a
    MetricInputError saying what it holds instead."""
    proba = np.asarray(proba, dtype=float)
    expected = (rows, len(labels))
    if proba.shape != expected:
        raise MetricInputError(
            f"probabilities of shape {proba.shape}, expected {expected}: one row per text "
            f"({rows}), one column per label ({', '.join(labels)})"
        )
    if not np.isfinite(proba).all():
        raise MetricInputError("probabilities hold NaN or infinite values")
    sums = proba.sum(axis=1)
    wrong = np.flatnonzero((proba < 0).any(axis=1) | (np.abs(sums - 1) > PROBABILITY_TOLERANCE))
    if wrong.size:
        row = wrong[0]
        raise MetricInputError(
            f"scores are not probabilities: {wrong.size} of {rows} rows have a negative value "
            f"or do not sum to 1 (row {row}: {np.round(proba[row], 4).tolist()}, sum "
            f"{sums[row]:.4g}); raw model scores (logits) must go through softmax first"
        )
    return proba


def label_scores(truth: np.ndarray, predicted: np.ndarray, n_labels: int) -> tuple[float, float]:
    """Accuracy and macro-F1 (over all `n_labels` classes; a class never true nor predicted
    scores 0) of predicted class ids against true class ids. Takes ids, not scores: the argmax
    of logits and of probabilities alike."""
    from sklearn.metrics import accuracy_score, f1_score

    truth, predicted = np.asarray(truth), np.asarray(predicted)
    if truth.ndim != 1 or truth.shape != predicted.shape:
        raise MetricInputError(
            f"class ids of shapes {truth.shape} (true) and {predicted.shape} (predicted): "
            "expected one id per text in each"
        )
    for name, ids in (("true", truth), ("predicted", predicted)):
        if ids.size and (ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= n_labels):
            raise MetricInputError(
                f"{name} class ids must be integers in [0, {n_labels}): got {ids[:5].tolist()}..."
            )
    ids = list(range(n_labels))
    return (
        float(accuracy_score(truth, predicted)),
        float(f1_score(truth, predicted, labels=ids, average="macro", zero_division=0)),
    )


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = 10
) -> float:
    """Σ_b (n_b / N) · |accuracy_b − mean confidence_b| over equal-width confidence bins.

    Takes each text's confidence as a probability in [0, 1] (the probability of its predicted
    label, not a logit) and whether that prediction is correct, one of each per text."""
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct)
    if confidence.ndim != 1 or confidence.shape != correct.shape:
        raise MetricInputError(
            f"confidences of shape {confidence.shape} and correctness of shape {correct.shape}: "
            "expected one of each per text"
        )
    if ((confidence < 0) | (confidence > 1 + PROBABILITY_TOLERANCE)).any():
        raise MetricInputError(
            f"confidences must be probabilities in [0, 1], got values from {confidence.min():.4g} "
            f"to {confidence.max():.4g}: take the largest probability, not the largest logit"
        )
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(total)


def compute_metrics(y_true: Sequence[str], proba: np.ndarray, labels: Sequence[str]) -> Metrics:
    """All overall scores from true labels (names) and predicted probabilities: one row per
    text, one column per label in `labels` order, rows summing to 1. Logits, or a shape that
    does not match, are a MetricInputError (check_probabilities)."""
    from sklearn.metrics import (
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    labels = list(labels)
    truth = label_ids(y_true, labels)
    proba = check_probabilities(proba, len(truth), labels)
    predicted = proba.argmax(axis=1)
    ids = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=ids, zero_division=0
    )
    accuracy, macro_f1 = label_scores(truth, predicted, len(labels))
    roc_auc = None
    if len(set(truth)) == len(labels):
        roc_auc = float(
            roc_auc_score(truth, proba[:, 1])
            if len(labels) == 2
            else roc_auc_score(truth, proba, multi_class="ovr", labels=ids)
        )
    return Metrics(
        rows=len(truth),
        accuracy=accuracy,
        macro_f1=macro_f1,
        weighted_f1=float(
            f1_score(truth, predicted, labels=ids, average="weighted", zero_division=0)
        ),
        roc_auc=roc_auc,
        ece=expected_calibration_error(proba.max(axis=1), predicted == truth),
        per_class={
            label: ClassMetrics(float(p), float(r), float(f), int(s))
            for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
        },
        confusion=confusion_matrix(truth, predicted, labels=ids).tolist(),
    )


def slice_metrics(
    frame: pd.DataFrame, proba: np.ndarray, labels: Sequence[str]
) -> list[SliceMetrics]:
    """Accuracy and macro-F1 per source and per text-length bucket, from probabilities as
    compute_metrics takes them, one row per row of `frame`."""
    proba = check_probabilities(proba, len(frame), labels)
    out = []
    for name, members in slice_masks(frame).items():
        scores = compute_metrics(frame["label"][members].tolist(), proba[members], labels)
        rows = int(members.sum())
        out.append(
            SliceMetrics(name, rows, scores.accuracy, scores.macro_f1, rows >= MIN_SLICE_ROWS)
        )
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
    texts = test_frame["text"].tolist()
    proba = model.predict_proba(texts, batch_size)
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
    baseline: BaselineReport,
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
