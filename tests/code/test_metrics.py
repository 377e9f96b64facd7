"""Metrics against hand-computed values and scikit-learn, and the checks of what they take."""

import numpy as np
import pandas as pd
import pytest

from flywheel.errors import FlywheelError
from flywheel.metrics import (
    MetricInputError,
    compute_metrics,
    expected_calibration_error,
    label_scores,
    macro_f1,
    slice_metrics,
)
from flywheel.models.bundle import softmax
from flywheel.slices import length_bucket

LABELS = ["neg", "pos"]
# 4 rows worked by hand: predictions pos, neg, neg, pos against truth pos, pos, neg, neg.
TRUTH = ["pos", "pos", "neg", "neg"]
PROBA = np.array([[0.2, 0.8], [0.6, 0.4], [0.9, 0.1], [0.3, 0.7]])


def test_metrics_match_hand_computed_values():
    m = compute_metrics(TRUTH, PROBA, LABELS)
    assert m.accuracy == 0.5
    assert m.macro_f1 == m.weighted_f1 == 0.5
    assert m.per_class["pos"].precision == m.per_class["pos"].recall == 0.5
    assert m.per_class["neg"].support == 2
    assert m.confusion == [[1, 1], [1, 1]]
    # pos scores 0.8, 0.4 vs neg rows 0.1, 0.7: 3 of 4 pairs ordered right.
    assert m.roc_auc == pytest.approx(0.75)
    # Each row alone in its bin: (|1-.8| + |0-.6| + |1-.9| + |0-.7|) / 4.
    assert m.ece == pytest.approx(0.4)


def test_ece_of_a_calibrated_model_is_zero():
    confidence = np.array([0.75] * 4)
    assert expected_calibration_error(confidence, np.array([1, 1, 1, 0])) == pytest.approx(0)


def test_multiclass_auc_and_missing_class():
    labels = ["a", "b", "c"]
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.3, 0.2]])
    assert compute_metrics(["a", "b", "c", "a"], proba, labels).roc_auc == pytest.approx(1.0)
    assert compute_metrics(["a", "b", "b", "a"], proba, labels).roc_auc is None


LOGITS = np.array([[2.0, -1.0, 0.5], [-0.3, 1.7, 0.2], [0.1, 0.4, 2.2], [1.2, 0.9, -2.0]])


def test_metrics_of_probabilities_take_no_logits():
    labels = ["a", "b", "c"]
    truth = ["a", "b", "c", "b"]
    # 3 labels: scikit-learn's multi-class ROC-AUC would fail on these with a bare ValueError
    with pytest.raises(MetricInputError, match="not probabilities.*softmax") as raised:
        compute_metrics(truth, LOGITS, labels)
    assert isinstance(raised.value, FlywheelError) and isinstance(raised.value, ValueError)
    assert "4 of 4 rows" in str(raised.value)
    m = compute_metrics(truth, softmax(LOGITS), labels)
    assert m.accuracy == 0.75  # the last text, a "b", is read as "a"
    assert m.roc_auc == 1.0  # yet each class's probability ranks its own texts first
    binary = np.array([[0.9, 0.2], [0.4, 0.6]])  # rows summing to 1.1 and 1.0
    with pytest.raises(MetricInputError, match=r"1 of 2 rows .* \(row 0: \[0.9, 0.2\], sum 1.1\)"):
        compute_metrics(["x", "y"], binary, ["x", "y"])
    with pytest.raises(MetricInputError, match="negative"):
        compute_metrics(["x", "y"], np.array([[1.2, -0.2], [0.5, 0.5]]), ["x", "y"])
    with pytest.raises(MetricInputError, match="NaN"):
        compute_metrics(["x", "y"], np.array([[np.nan, 1.0], [0.5, 0.5]]), ["x", "y"])


def test_metrics_check_shapes_and_labels():
    with pytest.raises(MetricInputError, match=r"shape \(4, 2\), expected \(3, 2\)"):
        compute_metrics(TRUTH[:3], PROBA, LABELS)
    with pytest.raises(MetricInputError, match=r"shape \(4, 2\), expected \(4, 3\)"):
        compute_metrics(TRUTH, PROBA, LABELS + ["meh"])
    with pytest.raises(MetricInputError, match=r"true labels \['fresh'\] are not labels"):
        compute_metrics(["pos", "fresh", "neg", "neg"], PROBA, LABELS)
    frame = pd.DataFrame({"text": ["a", "b"], "label": ["pos", "neg"], "source": "s"})
    with pytest.raises(MetricInputError, match="one row per text"):
        slice_metrics(frame, PROBA, LABELS)  # 4 rows of probabilities for 2 texts
    with pytest.raises(
        MetricInputError, match="probabilities in \\[0, 1\\].*not the largest logit"
    ):
        expected_calibration_error(LOGITS.max(axis=1), np.ones(4, dtype=bool))
    with pytest.raises(MetricInputError, match="one of each per text"):
        expected_calibration_error(np.array([0.5, 0.9]), np.ones(3, dtype=bool))


def test_label_scores_take_class_ids():
    # the ids of TRUTH and of PROBA's argmax: 2 of 4 right, each class F1 0.5
    assert label_scores(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 1]), 2) == (0.5, 0.5)
    # a class never true nor predicted counts 0 in the macro mean
    assert label_scores(np.array([0, 1]), np.array([0, 1]), 4) == (1.0, 0.5)
    with pytest.raises(MetricInputError, match=r"integers in \[0, 2\)"):
        label_scores(np.array([0, 1]), np.array([0.2, 0.8]), 2)  # scores, not ids
    with pytest.raises(MetricInputError, match="one id per text"):
        label_scores(np.array([0, 1]), np.array([[0, 1]]), 2)


def test_slices_by_source_and_length():
    frame = pd.DataFrame(
        {
            "text": ["short", "x" * 70, "y" * 200, "tiny"],
            "label": TRUTH,
            "source": ["rotten_tomatoes", "feedback", "feedback", "rotten_tomatoes"],
        }
    )
    got = {s.slice: s for s in slice_metrics(frame, PROBA, LABELS)}
    assert set(got) == {
        "source=feedback",
        "source=rotten_tomatoes",
        "length=0-59",
        "length=60-139",
        "length=140+",
    }
    assert got["source=feedback"].rows == 2
    assert got["source=feedback"].accuracy == 0.5  # row 2 wrong, row 3 right
    assert got["length=0-59"].accuracy == 0.5
    assert not got["length=0-59"].judged
    assert [length_bucket(n) for n in (0, 59, 60, 139, 140)] == [
        "0-59",
        "0-59",
        "60-139",
        "60-139",
        "140+",
    ]


def test_macro_f1_is_scikit_learns_over_every_label_even_one_never_predicted():
    from sklearn.metrics import f1_score

    truth = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 0, 0])  # class 2 is never predicted
    expected = f1_score(truth, predicted, labels=[0, 1, 2], average="macro", zero_division=0)
    assert macro_f1(truth, predicted, 3) == pytest.approx(expected)
    # by hand: class 0 P 1/3 R 1/2 -> 0.4; class 1 P 2/3 R 1 -> 0.8; class 2 -> 0
    assert macro_f1(truth, predicted, 3) == pytest.approx((0.4 + 0.8 + 0.0) / 3)
    # a fourth label, neither true nor predicted, counts 0 in the mean
    assert macro_f1(truth, predicted, 4) == pytest.approx((0.4 + 0.8) / 4)


def test_ece_weighs_each_bin_by_its_share_of_texts():
    # bin 0.9-1.0: 3 texts at 0.95, 2 right (|2/3 - 0.95|); bin 0.5-0.6: 1 text at 0.55, wrong
    confidence = np.array([0.95, 0.95, 0.95, 0.55])
    correct = np.array([True, True, False, False])
    expected = 3 / 4 * abs(2 / 3 - 0.95) + 1 / 4 * abs(0 - 0.55)
    assert expected_calibration_error(confidence, correct) == pytest.approx(expected)
