"""The int8 search and its gate: a variant against fp32 on the same texts (agreement, accuracy
and macro-F1 loss, overall and per slice: `compare`), node groups kept in fp32 by sensitivity
(`search`), and the pure choice of the variant to ship (`choose`).
Why, and the measurements behind the bounds: docs/decisions/0005-onnx-export-and-int8-search.md.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from flywheel.config import ExportConfig
from flywheel.metrics import MetricInputError, label_ids, label_scores
from flywheel.models.graph import (
    quantize,
    timed_logits,
)
from flywheel.models.predictor import OnnxPredictor
from flywheel.slices import slice_masks

log = logging.getLogger(__name__)


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
