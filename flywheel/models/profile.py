"""The reference profile: what traffic a model was built for, saved beside it (drift baseline).

The export stage writes `reference.json` (`ReferenceProfile`: histograms and label shares of the
test split and the exported model's answers on it) and `vocabulary.txt` (top training words, one
per line), of normalised text: lengths in characters, words case-folded. `Histogram.cuts` are the
inner bin edges: v is in bin searchsorted(cuts, v, side="right"), len(cuts) + 1 bins.
Why: docs/decisions/0009-serving-feedback-and-retrain-trigger.md.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flywheel.text import normalised_key

PROFILE_FILE = "reference.json"
VOCABULARY_FILE = "vocabulary.txt"


@dataclass(frozen=True)
class Histogram:
    """Shares of values per bin; bins are split at `cuts` (len(shares) == len(cuts) + 1)."""

    cuts: list[float]
    shares: list[float]

    @classmethod
    def of(cls, values: Sequence[float], bins: int) -> Histogram:
        """Quantile bins of the values themselves (repeated quantiles merged)."""
        values = np.asarray(values, dtype=float)
        inner = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]) if len(values) else []
        cuts = sorted({float(c) for c in inner})
        return cls(cuts, shares(values, cuts))


def shares(values: Sequence[float], cuts: Sequence[float]) -> list[float]:
    """Share of values in each bin of `cuts` (all zeros for no values)."""
    values = np.asarray(values, dtype=float)
    counts = np.bincount(np.searchsorted(cuts, values, side="right"), minlength=len(cuts) + 1)
    return (counts / max(len(values), 1)).tolist()


def words(text: str) -> list[str]:
    """Case-folded words of a (normalised) text."""
    return normalised_key(text).split()


def oov_rate(text: str, vocabulary: frozenset[str]) -> float:
    """Share of a text's words outside the vocabulary (0 for a text without words)."""
    found = words(text)
    return sum(w not in vocabulary for w in found) / len(found) if found else 0.0


def top_words(texts: Iterable[str], size: int) -> list[str]:
    """The `size` most frequent words, most frequent first (ties: alphabetical)."""
    counts = Counter(w for text in texts for w in words(text))
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]


@dataclass(frozen=True)
class ReferenceProfile:
    """Reference statistics of one model (see the module docstring)."""

    rows: int  # reference texts (the test split)
    length: Histogram  # characters per text
    confidence: Histogram  # the model's top probability per text
    oov: Histogram  # per text: share of words outside the vocabulary
    oov_mean: float
    predicted_labels: dict[str, float]  # share of texts per predicted label
    training_labels: dict[str, float]  # share of training rows per true label
    vocabulary_size: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> ReferenceProfile:
        hist = {k: Histogram(**raw[k]) for k in ("length", "confidence", "oov")}
        return cls(**(raw | hist))


def build(
    train_texts: Sequence[str],
    train_labels: Sequence[str],
    texts: Sequence[str],
    proba: np.ndarray,
    labels: Sequence[str],
    bins: int,
    vocabulary_size: int,
) -> tuple[ReferenceProfile, list[str]]:
    """The profile of normalised reference texts with the model's probabilities on them; the
    vocabulary comes from the (normalised) training texts."""
    vocabulary = top_words(train_texts, vocabulary_size)
    known = frozenset(vocabulary)
    oov = [oov_rate(t, known) for t in texts]
    predicted = Counter(labels[int(i)] for i in np.asarray(proba).argmax(axis=1))
    trained = Counter(train_labels)
    profile = ReferenceProfile(
        rows=len(texts),
        length=Histogram.of([len(t) for t in texts], bins),
        confidence=Histogram.of(np.asarray(proba).max(axis=1), bins),
        oov=Histogram.of(oov, bins),
        oov_mean=float(np.mean(oov)) if oov else 0.0,
        predicted_labels={label: predicted[label] / max(len(texts), 1) for label in labels},
        training_labels={
            label: trained[label] / max(len(train_labels), 1) for label in sorted(trained)
        },
        vocabulary_size=len(vocabulary),
    )
    return profile, vocabulary


def save(directory: Path, profile: ReferenceProfile, vocabulary: Sequence[str]) -> None:
    (directory / PROFILE_FILE).write_text(json.dumps(profile.to_dict(), indent=2) + "\n")
    (directory / VOCABULARY_FILE).write_text("".join(f"{w}\n" for w in vocabulary))


def load_profile(directory: Path) -> ReferenceProfile | None:
    """The saved profile, or None for a model exported before profiles existed."""
    path = directory / PROFILE_FILE
    return ReferenceProfile.from_dict(json.loads(path.read_text())) if path.is_file() else None


def load_vocabulary(directory: Path) -> frozenset[str] | None:
    path = directory / VOCABULARY_FILE
    return frozenset(path.read_text().split("\n")) - {""} if path.is_file() else None
