"""The int8 search and its gate: a variant against fp32 on the same texts (agreement, accuracy
and macro-F1 loss, overall and per slice: `compare`), node groups kept in fp32 by their
simulated int8 error (`sensitivity`, `search`), and the pure choice of the variant to ship
(`choose`: by measured parity; timing only checks the minimum speed-up).
Why, and the measurements behind the bounds: docs/decisions/0005-onnx-export-and-int8-search.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flywheel.config import ExportConfig
from flywheel.metrics import MetricInputError, label_ids, label_scores
from flywheel.models.bundle import ClassifierBundle
from flywheel.models.graph import quantize, timed_logits
from flywheel.models.predictor import OnnxPredictor
from flywheel.progress import progress
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
    if not len(frame):
        raise MetricInputError(f"no texts to compare {variant} with fp32 on (an empty split)")
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


SCHEMES = {"int8": False, "int8-per-channel": True}  # name -> per-channel weights


# The most sensitive groups of each scheme whose first-order estimate is replaced by their
# simulation. The estimate can be 2-2.5x low for an FFN output of a small model (the
# three-class test model's second group ranked 6th by estimate), so 8 rather than the 3 or 4
# groups the default search keeps in fp32.
EXACT_TOP = 8


def sensitivity(
    bundle: ClassifierBundle,
    groups: Mapping[str, Sequence[str]],
    texts: Sequence[str],
    exact_top: int = EXACT_TOP,
) -> dict[str, dict[str, float]]:
    """How much int8 in one group alone moves the fp32 model's decisions on `texts`, per scheme
    (`SCHEMES`): the mean |change of the decision margin| (the top logit minus the runner-up),
    every other group in fp32. A group is a module path of the classifier (`node_groups`).

    Every group is first estimated to first order from one forward and one backward pass
    (`estimated_sensitivity`), then the groups at the top are simulated (`SensitivityProbe`),
    one forward pass each, until the `exact_top` most sensitive groups of each scheme are
    simulated ones: the groups the search keeps in fp32 first are ranked by measurement, the
    tail by the estimate. On MiniLM-L6 and 64 texts: about 20 passes instead of 82, and the
    estimate alone orders the groups as the simulation does (Spearman 0.999, the same top 5).
    Deterministic: nothing is timed."""
    scores = estimated_sensitivity(bundle, groups, texts)
    probe = SensitivityProbe(bundle, texts)
    for scheme, per_channel in SCHEMES.items():
        simulated: set[str] = set()
        while unsimulated := [
            g for g in ranked(groups, scores[scheme])[:exact_top] if g not in simulated
        ]:
            group = unsimulated[0]
            scores[scheme][group] = probe.margin_shift(group, per_channel)
            simulated.add(group)
    return scores


def simulated_sensitivity(
    bundle: ClassifierBundle, groups: Mapping[str, Sequence[str]], texts: Sequence[str]
) -> dict[str, dict[str, float]]:
    """What `sensitivity` reports, simulated for every group (one forward pass per group and
    scheme: ~80 for MiniLM-L6, over a minute on 64 texts and 2 cores): the reference the
    estimate is checked against (tests/model/test_export.py)."""
    probe = SensitivityProbe(bundle, texts)
    return {
        scheme: {group: probe.margin_shift(group, per_channel) for group in groups}
        for scheme, per_channel in SCHEMES.items()
    }


class SensitivityProbe:
    """Simulates int8 in one group of the PyTorch model at a time on fixed texts (batched as
    onnxruntime batches them: sorted by length, 64 a batch) and measures how far the fp32
    decision margins move."""

    def __init__(self, bundle: ClassifierBundle, texts: Sequence[str]) -> None:
        self.bundle = bundle
        self.model = bundle.model.eval()
        encoded = bundle.encode(texts)
        order = np.argsort([len(ids) for ids in encoded["input_ids"]], kind="stable")
        self.rows = [{k: encoded[k][i] for k in encoded} for i in order]
        reference = bundle.logits_of_encoded(self.rows)
        self.top2 = np.argsort(-reference, axis=1, kind="stable")[:, :2]  # fp32's top two
        self.reference = self._margins(reference)

    def _margins(self, logits: np.ndarray) -> np.ndarray:
        """The logit of fp32's top class minus that of its runner-up, per text."""
        return np.take_along_axis(logits, self.top2, axis=1) @ np.array([1.0, -1.0])

    def margin_shift(self, group: str, per_channel: bool) -> float:
        """Mean |margin - fp32 margin| with `group`'s layers int8-rounded (`_fake_int8`); 0 for
        a group named after no module (ranked last)."""
        linears, tables = _int8_members(self.model, group)
        if not linears and not tables:
            return 0.0
        with _fake_int8(linears, tables, per_channel):
            logits = self.bundle.logits_of_encoded(self.rows)
        return float(np.abs(self._margins(logits) - self.reference).mean())


def estimated_sensitivity(
    bundle: ClassifierBundle,
    groups: Mapping[str, Sequence[str]],
    texts: Sequence[str],
    batch_size: int = 64,
) -> dict[str, dict[str, float]]:
    """`sensitivity` to first order, every group from one forward and one backward pass over
    `texts`: the forward pass records each affected layer's input and output, the backward
    pass the gradient of the summed margins with respect to those outputs. A group's int8
    rounding changes its layers' outputs by `delta` (`_int8_output_change`), so a text's
    margin moves by about sum(gradient * delta) over the group's layers. Close for the small
    changes int8 rounding makes; less so where a change passes through several nonlinear
    layers (an early FFN output of a small model: up to 2x), hence the simulation of the top
    groups in `sensitivity`."""
    import torch

    model = bundle.model.eval()
    members = {group: _int8_members(model, group) for group in groups}
    layers = {id(m): m for linears, tables in members.values() for m in (*linears, *tables)}
    encoded = bundle.encode(texts)
    order = np.argsort([len(ids) for ids in encoded["input_ids"]], kind="stable")
    rows = [{k: encoded[k][i] for k in encoded} for i in order]  # batched as onnxruntime does
    shifts: dict[str, dict[str, list[Any]]] = {s: {g: [] for g in groups} for s in SCHEMES}
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in bundle.pad(rows[start : start + batch_size]).items()}
        seen = _record(layers.values(), len(batch["input_ids"]))
        with torch.enable_grad(), seen:
            _margins(model(**batch).logits.float()).sum().backward()
        model.zero_grad(set_to_none=True)
        for scheme, per_channel in SCHEMES.items():
            for group, (linears, tables) in members.items():
                shift = torch.zeros(len(batch["input_ids"]))
                for layer in (*linears, *tables):
                    key = id(layer)
                    delta = _int8_output_change(
                        layer, seen.inputs[key], seen.outputs[key], per_channel
                    )
                    shift += (seen.grads[key] * delta).flatten(1).sum(dim=1).cpu()
                shifts[scheme][group].append(shift.abs())
    return {
        scheme: {group: float(torch.cat(parts).mean()) for group, parts in by_group.items()}
        for scheme, by_group in shifts.items()
    }


def _margins(logits: Any) -> Any:
    """Per row of a torch tensor: the top logit minus the largest other one."""
    top2 = logits.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


class _record:
    """While open: each layer's input, output and (after backward) the gradient at its output,
    one row per text of a batch of `rows`, for one forward-backward pass, keyed by id(layer).
    An output shared by the batch (the position embeddings: one row, broadcast) is expanded to
    `rows` rows first, so its gradient is per text rather than summed over the batch."""

    def __init__(self, layers: Any, rows: int) -> None:
        self.layers = list(layers)
        self.rows = rows
        self.inputs: dict[int, Any] = {}
        self.outputs: dict[int, Any] = {}
        self.grads: dict[int, Any] = {}
        self.hooks: list[Any] = []

    def __enter__(self) -> _record:
        for layer in self.layers:
            self.hooks.append(layer.register_forward_hook(self._seen))
        return self

    def _seen(self, layer: Any, args: tuple[Any, ...], out: Any) -> Any:
        key = id(layer)
        self.inputs[key], self.outputs[key] = args[0].detach(), out.detach()
        if out.shape[0] == 1 < self.rows:
            out = out.expand(self.rows, *out.shape[1:])
        out.register_hook(lambda grad: self.grads.__setitem__(key, grad.detach()))
        return out

    def __exit__(self, *exc: object) -> None:
        for handle in self.hooks:
            handle.remove()


def _int8_output_change(layer: Any, x: Any, out: Any, per_channel: bool) -> Any:
    """How int8 rounding changes `layer`'s output `out` for the input `x`: a Linear with its
    input and weights rounded (as `_fake_int8` rounds them), an embedding table with its
    weights rounded."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        if isinstance(layer, torch.nn.Embedding):
            return F.embedding(x, _int8_weights(layer.weight, per_channel=False)) - out
        weight = _int8_weights(layer.weight.T, per_channel).T
        return F.linear(_int8_activations(x), weight, layer.bias) - out


def _int8_members(model: Any, group: str) -> tuple[list[Any], list[Any]]:
    """The layers int8 changes in a group: its Linear layers (the module itself, or its direct
    children: a fused attention's query, key and value) and embedding table (the module, or
    its first child table: the word table of a fused embedding layer). Nothing for a group
    named after no module."""
    import torch

    try:
        module = model.get_submodule(group)
    except AttributeError:
        return [], []
    linears = (
        [module]
        if isinstance(module, torch.nn.Linear)
        else [m for m in module.children() if isinstance(m, torch.nn.Linear)]
    )
    tables = (
        [module]
        if isinstance(module, torch.nn.Embedding)
        else [m for m in module.children() if isinstance(m, torch.nn.Embedding)][:1]
    )  # the word table, symmetric int8: an approximation. onnxruntime's fused embedding layer
    # quantizes all three tables and its LayerNorm (uint8 with a zero point), so the score of
    # `bert.embeddings` understates its error (it ranks low either way on the default model)
    return linears, tables


@contextmanager
def _fake_int8(linears: list[Any], tables: list[Any], per_channel: bool) -> Iterator[None]:
    """While open: the `linears` compute with int8-rounded inputs and weights, the `tables`
    hold int8-rounded weights."""
    saved = [(m, m.weight.data) for m in linears + tables]
    hooks = []

    def hook(layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        return (_int8_activations(args[0]), *args[1:]), kwargs

    try:  # set up inside: a failure half-way is undone too
        for m in linears:
            m.weight.data = _int8_weights(m.weight.data.T, per_channel).T  # (out, in)
            hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
        for m in tables:
            m.weight.data = _int8_weights(m.weight.data, per_channel=False)
        yield
    finally:
        for handle in hooks:
            handle.remove()
        for m, weight in saved:
            m.weight.data = weight


def _int8_activations(x: Any) -> Any:
    """`x` (a torch tensor) through onnxruntime's DynamicQuantizeLinear (uint8, one scale for
    the tensor, zero included in the range) and back."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (high - low) / 255.0 or 1.0
    zero = round(-low / scale)
    return ((x / scale).round().add(zero).clamp(0, 255).sub(zero)) * scale


def _int8_weights(w: Any, per_channel: bool) -> Any:
    """`w` (a torch tensor, in x out) rounded to symmetric int8, one scale per tensor or per
    output column, and back."""
    largest = w.abs().amax(dim=0, keepdim=True) if per_channel else w.abs().max()
    scale = (largest / 127.0).clamp(min=1e-12)
    return (w / scale).round() * scale


def ranked(groups: Mapping[str, Sequence[str]], scores: Mapping[str, float]) -> list[str]:
    """Groups, most sensitive first; equal scores by name (the order is deterministic)."""
    return sorted(groups, key=lambda g: (-scores.get(g, 0.0), g))


@dataclass(frozen=True)
class Variant:
    """One int8 candidate of the search, judged on the validation split."""

    name: str
    per_channel: bool
    keep_fp32: tuple[str, ...]  # node groups left in fp32, most sensitive first
    path: Path
    val: Parity


def search(
    bundle: ClassifierBundle,
    fp32: Path,
    groups: dict[str, list[str]],
    directory: Path,
    val_frame: pd.DataFrame,
    bounds: GateBounds,
    sensitivity_rows: int,
    max_fp32_groups: int,
    work: Path,
    accept: Callable[[Variant], bool] | None = None,
) -> tuple[list[Variant], dict[str, dict[str, float]]]:
    """Int8 candidates of `fp32` on the validation split: for k = 0, 1, ... (at most
    `max_fp32_groups`), each scheme (per-tensor, per-channel weights) with its k most sensitive
    node groups kept in fp32, stopping after the first k at which a candidate passing the gate
    is accepted: `accept` (the export stage's test gate, then its speed check) is asked about the
    candidates passing val at that k in `preference` order; without it, passing val is enough.
    `preference` takes the fewest groups in fp32 first, so no candidate with more could be
    chosen. Returns the candidates and each group's sensitivity per scheme (`sensitivity`, on
    the first `sensitivity_rows` validation texts; computed only when the search goes past
    whole-model int8).
    Nothing here is timed: the same model and data give the same candidates under any load
    (and so does `accept` if its timing only checks a minimum speed-up)."""
    texts = val_frame["text"].tolist()
    fp32_predictor = OnnxPredictor(directory, fp32)
    labels = fp32_predictor.labels
    reference = fp32_predictor.logits(texts)
    scores: dict[str, dict[str, float]] = {}
    candidates: list[Variant] = []
    with progress("export: int8 search", None, unit="candidate", every=1, logger=log) as bar:
        for k in range(min(max_fp32_groups, len(groups)) + 1):
            if k and not scores:  # whole-model int8 failed: rank the groups
                probe = val_frame.head(sensitivity_rows)["text"].tolist()
                scores = sensitivity(bundle, groups, probe)
                for scheme in SCHEMES:
                    top = ranked(groups, scores[scheme])[:3]
                    log.info("export: %s, most sensitive groups: %s", scheme, ", ".join(top))
            for scheme, per_channel in SCHEMES.items():
                keep = tuple(ranked(groups, scores[scheme])[:k]) if k else ()
                name = f"{scheme}-fp32x{k}" if k else scheme
                nodes = [n for g in keep for n in groups[g]]
                path = quantize(fp32, work / f"{name}.onnx", per_channel, nodes)
                logits = OnnxPredictor(directory, path).logits(texts)
                parity = compare(name, reference, logits, val_frame, labels, bounds)
                candidates.append(Variant(name, per_channel, keep, path, parity))
                bar.advance(
                    candidate=name,
                    agreement=f"{parity.agreement:.2%}",
                    verdict="passes" if parity.passed else "fails",
                )
            passing = sorted(
                (c for c in candidates[-len(SCHEMES) :] if c.val.passed), key=preference
            )
            if any(accept is None or accept(c) for c in passing):  # stops at the first accepted
                break
    return candidates, scores


def preference(variant: Variant) -> tuple[int, float, float, str]:
    """The order in which candidates passing val are taken: fewest groups kept in fp32 (the
    most int8), then the higher val agreement, the smaller val macro-F1 loss, the name. Measured
    figures that do not depend on the machine's load."""
    v = variant.val
    return (len(variant.keep_fp32), -v.agreement, v.macro_f1_loss, variant.name)


def speedups(
    fp32: Path, variants: Sequence[Variant], directory: Path, texts: Sequence[str], rounds: int = 2
) -> dict[str, float]:
    """fp32 time / each variant's time scoring `texts`: `rounds` interleaved rounds after a
    warm-up, the best round of each (the one least disturbed by other work)."""
    engines = {"fp32": OnnxPredictor(directory, fp32)}
    engines |= {v.name: OnnxPredictor(directory, v.path) for v in variants}
    best = dict.fromkeys(engines, float("inf"))
    for round_ in range(rounds):
        for name, engine in engines.items():
            _, seconds = timed_logits(engine, texts, warm_up=round_ == 0)
            best[name] = min(best[name], seconds)
    return {v.name: best["fp32"] / best[v.name] for v in variants}


def choose(
    candidates: Sequence[Variant],
    on_test: Mapping[str, Parity],
    speedup: Mapping[str, float],
    min_speedup: float,
) -> tuple[Variant | None, Parity | None, list[str]]:
    """The int8 variant to ship, its parity on the test split, and why the others are not.

    A pure function of measured figures: each candidate's val parity, `on_test` (the test
    parity of the candidates passing val that the export stage asked about) and `speedup` (of
    those it timed: the ones passing test). The first candidate passing val, in `preference`
    order, whose test parity passes and which scores at least `min_speedup` times as fast as
    fp32 is chosen; timing only decides whether a variant clears `min_speedup`, never which of
    two passing variants ships. None passing: (None, None, reasons), the first val failure of
    each candidate first (the fp32 model is the export)."""
    rejected: list[str] = []  # candidates passing val, refused on test or for speed
    asked = [c for c in candidates if c.val.passed and (c.name in on_test or c.name in speedup)]
    for variant in sorted(asked, key=preference):
        parity = on_test.get(variant.name)
        if parity is not None and not parity.passed:
            rejected += [f"{variant.name} on test: {f}" for f in parity.failures]
        elif variant.name in speedup and speedup[variant.name] < min_speedup:
            rejected.append(
                f"{variant.name} passes val at {speedup[variant.name]:.2f}x fp32 speed "
                f"(export.min_int8_speedup {min_speedup:g})"
            )
        elif parity is not None and variant.name in speedup:
            return variant, parity, rejected
    failed_val = [f"{c.name} on val: {c.val.failures[0]}" for c in candidates if c.val.failures]
    return None, None, failed_val + rejected
