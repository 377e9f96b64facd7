"""Metrics: how any classifier's predictions are scored, in one place.

Overall scores (accuracy, macro-F1, ROC-AUC, calibration error, per class, confusion), slices,
macro-F1 of class ids (training's model selection, the baseline's grid, the int8 gate) and
metric names MLflow accepts. Plain functions of arrays and frames: no orchestrator, tracker or
web framework. Each metric checks what it takes (probabilities, ids, shapes) and says what it
got instead.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from flywheel.errors import FlywheelError
from flywheel.slices import slice_masks

MIN_SLICE_ROWS = 30  # smaller slices are reported but not judged
# scikit-learn's own tolerance for "each row sums to 1" (multi-class ROC-AUC, np.allclose's
# defaults): what passes here passes there.
PROBABILITY_TOLERANCE = 1e-5


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


def macro_f1(y_true_ids: np.ndarray, y_pred_ids: np.ndarray, n_labels: int) -> float:
    """Mean F1 over all `n_labels` classes of class ids (a class never true nor predicted
    scores 0)."""
    from sklearn.metrics import f1_score

    return float(
        f1_score(
            y_true_ids, y_pred_ids, labels=list(range(n_labels)), average="macro", zero_division=0
        )
    )


def label_scores(truth: np.ndarray, predicted: np.ndarray, n_labels: int) -> tuple[float, float]:
    """Accuracy and macro-F1 (macro_f1) of predicted class ids against true class ids. Takes
    ids, not scores: the argmax of logits and of probabilities alike."""
    from sklearn.metrics import accuracy_score

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
    return float(accuracy_score(truth, predicted)), macro_f1(truth, predicted, n_labels)


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
    accuracy, macro = label_scores(truth, predicted, len(labels))
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
        macro_f1=macro,
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
