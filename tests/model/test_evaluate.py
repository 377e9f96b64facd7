"""The evaluation report: behavioural checks against broken models, files, metric names."""

import json

import numpy as np
import pandas as pd

from flywheel.metrics import compute_metrics, slice_metrics
from flywheel.tasks.evaluate import EvaluationReport, evaluate

# 4 rows: predictions pos, neg, neg, pos (as in tests/code/test_metrics.py).
PROBA = np.array([[0.2, 0.8], [0.6, 0.4], [0.9, 0.1], [0.3, 0.7]])


class WordModel:
    """Positive iff a positive word appears: insensitive to names and placeholders."""

    labels = ["negative", "positive"]
    good = (
        "wonderful",
        "moving",
        "brilliant",
        "masterpiece",
        "best",
        "loved",
        "triumph",
        "warm",
        "joy",
    )

    def predict_proba(self, texts, batch_size=0):
        pos = np.array([any(w in t.lower() for w in self.good) for t in texts], dtype=float)
        return np.stack([1 - pos * 0.9 - 0.05, pos * 0.9 + 0.05], axis=1)


class NameBiasedModel(WordModel):
    """Broken: says positive whenever a particular actor or an e-mail placeholder appears."""

    def predict_proba(self, texts, batch_size=0):
        proba = super().predict_proba(texts)
        biased = np.array(["Tom Hanks" in t or "<EMAIL>" in t for t in texts])
        proba[biased] = [0.05, 0.95]
        return proba


def test_behaviour_passes_for_a_sound_model_and_fails_for_a_biased_one(tmp_path):
    frame = pd.DataFrame(
        {
            "text": ["a wonderful film", "dull"] * 20,
            "label": ["positive", "negative"] * 20,
            "source": "test",
        }
    )
    sound = evaluate(WordModel(), frame, tmp_path / "sound", "word", "positive", "negative")
    assert all(check.passed for check in sound.behaviour), sound.behaviour
    broken = evaluate(
        NameBiasedModel(), frame, tmp_path / "broken", "biased", "positive", "negative"
    )
    by_name = {check.name: check for check in broken.behaviour}
    assert not by_name["swap person name"].passed
    assert not by_name["swap PII placeholder"].passed
    assert "Tom Hanks" in by_name["swap person name"].examples[0]
    saved = json.loads((tmp_path / "broken" / "report.json").read_text())
    assert saved["behaviour"][1]["passed"] is False
    assert (tmp_path / "broken" / "confusion.png").stat().st_size > 1000
    assert (tmp_path / "broken" / "reliability.png").stat().st_size > 1000


def test_minimum_functionality_needs_known_polarity(tmp_path):
    frame = pd.DataFrame(
        {
            "text": ["a wonderful film", "dull"] * 20,
            "label": ["positive", "negative"] * 20,
            "source": "test",
        }
    )
    report = evaluate(WordModel(), frame, tmp_path, "word")
    assert [c.kind for c in report.behaviour] == ["invariance", "invariance"]
    assert report.worst == []


def test_scalars_are_valid_mlflow_metric_names_without_collisions():
    from mlflow.utils.validation import _validate_metric_name

    labels = ["macro", "a//b"]
    frame = pd.DataFrame(
        {
            "text": ["short", "x" * 70, "y" * 200, "tiny"],
            "label": ["macro", "macro", "a//b", "a//b"],
            "source": ["/proj/../shared/r.csv", "feedback", "feedback", "s" * 300],
        }
    )
    report = EvaluationReport(
        model="m",
        labels=labels,
        metrics=compute_metrics(frame["label"].tolist(), PROBA, labels),
        slices=slice_metrics(frame, PROBA, labels),
        worst=[],
        behaviour=[],
        artifacts={},
    )
    scalars = report.scalars()
    for name in scalars:
        _validate_metric_name(name)  # raises on a name MLflow would reject
        assert len(name) <= 250
    assert scalars["test_macro_f1"] == report.metrics.macro_f1  # not overwritten by label "macro"
    assert "test_class.macro.f1" in scalars and "test_class.a__b.f1" in scalars
    assert "test_slice.source._proj_.._shared_r.csv.accuracy" in scalars
    assert len([k for k in scalars if k.startswith("test_slice.source.")]) == 2 * 3
