"""Promotion policy over the registry client: a version is scored now on the test split, judged by
the gates (flywheel/gates.py) against the champion re-scored on the same texts, and the aliases
move on the verdict, each gate's figures going into the version's tags and the audit entry. Also
promotion by hand, rollback and the comparison of two versions. Why re-score, why paired
intervals, why the tags before the move: docs/decisions/0006 and 0012.
"""

from __future__ import annotations

import getpass
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import pandas as pd

from flywheel import gates
from flywheel.config import Config, RegistryConfig
from flywheel.gates import Check
from flywheel.locks import registry_lock
from flywheel.metrics import Metrics, SliceMetrics, compute_metrics, metric_name, slice_metrics
from flywheel.models.predictor import OnnxPredictor
from flywheel.registry import (
    CHALLENGER,
    CHAMPION,
    GATE_TAG_PREFIX,
    PREVIOUS,
    PROMOTION_TAG,
    REASONS_TAG,
    ROLLED_BACK,
    AuditEntry,
    ModelRegistry,
    RegistryError,
)
from flywheel.slices import slice_masks

log = logging.getLogger(__name__)


class Latency(Protocol):
    """A latency measurement: the gates read its p95. The export stage measures it
    (`measure_latency`); the caller passes that in, as the domain imports no stage."""

    @property
    def p95_ms(self) -> float: ...


LatencyProbe = Callable[[OnnxPredictor, Sequence[str]], Latency]  # predictor, texts -> latency


@dataclass(frozen=True)
class Scores:
    """A model's scores on one test split: overall and per slice."""

    metrics: Metrics
    slices: list[SliceMetrics]

    @classmethod
    def compute(cls, frame: pd.DataFrame, proba: np.ndarray, labels: Sequence[str]) -> Scores:
        return cls(
            compute_metrics(frame["label"].tolist(), proba, labels),
            slice_metrics(frame, proba, labels),
        )

    def headline(self) -> dict[str, float]:
        return {"test_macro_f1": self.metrics.macro_f1, "test_accuracy": self.metrics.accuracy}


@dataclass(frozen=True)
class Scored:
    """A registered version scored now on a test split: its scores and its answers."""

    version: str
    scores: Scores
    labels: list[str]  # the model's label set
    answers: list[str]  # its label for each row
    predictor: OnnxPredictor


@dataclass(frozen=True)
class Decision:
    """What the gates said about one version and what moved."""

    version: str
    promoted: bool
    checks: list[Check]
    champion_before: str | None
    champion_scores: dict[str, float]  # the champion re-scored on the current test split
    forced: bool = False
    moves: list[AuditEntry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # estimates reported, not judged
    paired: gates.Paired | None = None  # the text-by-text comparison with the champion

    @property
    def reasons(self) -> list[str]:
        return [c.detail for c in self.checks if not c.passed]

    @property
    def already_champion(self) -> bool:
        """The version was champion before this decision (nothing judged, nothing moved)."""
        return self.promoted and not self.moves and self.champion_before == self.version

    def gate_lines(self) -> list[str]:
        """Every gate with its figures and verdict, then what was reported but not judged."""
        return gates.lines(self.checks, self.notes)

    def summary(self) -> str:
        if self.already_champion:
            return f"version {self.version} is already champion (promoted by an earlier run)"
        before = f"champion was {self.champion_before}" if self.champion_before else "no champion"
        if self.promoted:
            how = "forced past the gates" if self.forced else "all gates passed"
            return f"version {self.version} is champion ({how}; {before})"
        outcome = "is challenger" if self.moves else "is not promoted"
        return f"version {self.version} {outcome} ({before}): " + "; ".join(self.reasons)

    def cache_facts(self) -> dict[str, str]:
        """The champion this decision left: a rollback or manual promotion since re-opens it."""
        champion = self.version if self.promoted else self.champion_before
        return {"champion": champion or "none"}


def gate_tags(checks: Sequence[Check]) -> dict[str, str]:
    """Each gate's verdict as a version tag, e.g. flywheel.gate.overall.accuracy."""
    return {
        GATE_TAG_PREFIX + metric_name(c.name.replace("=", "_")).replace(" ", "."): c.line()[:5000]
        for c in checks
    }


def promote(
    registry: ModelRegistry,
    verdict: gates.Verdict,
    version: str,
    metrics: dict[str, float],
    champion_scores: dict[str, float],
    rc: RegistryConfig,
    reason: str,
    actor: str,
    *,
    force: bool = False,
    challenger_on_fail: bool = True,
) -> Decision:
    """Move the aliases on the gates' verdict: champion (+ previous) when they pass or `force`,
    otherwise challenger (when `challenger_on_fail`); the verdict of every gate goes into the
    version's tags and the audit entries."""
    aliases = registry.aliases()
    promoted = verdict.passed or force
    decision = Decision(
        version,
        promoted,
        verdict.checks,
        aliases.get(CHAMPION),
        champion_scores,
        promoted and not verdict.passed,
        [],
        verdict.notes,
        verdict.paired,
    )
    if not promoted and not challenger_on_fail:
        return decision
    moves, why, tags = _alias_moves(verdict, version, aliases, reason, promoted)
    with _tagged(registry, version, tags | gate_tags(verdict.checks)):
        entries = registry.move(
            moves, why, actor, metrics, rc.model_dump(exclude={"model_name"}), verdict.lines()
        )
    return replace(decision, moves=entries)


def _alias_moves(
    verdict: gates.Verdict, version: str, aliases: dict[str, str], reason: str, promoted: bool
) -> tuple[list[tuple[str, str | None]], str, dict[str, str]]:
    """The alias moves of a decision, the reason they are logged with and the version's
    promotion tags."""
    failed = "; ".join(verdict.reasons)
    if not promoted:
        why = f"{reason}: gates failed: {failed}"
        return [(CHALLENGER, version)], why, {PROMOTION_TAG: "rejected", REASONS_TAG: failed[:5000]}
    before = aliases.get(CHAMPION)
    moves: list[tuple[str, str | None]] = [(CHAMPION, version)]
    if before is not None and before != version:
        moves.append((PREVIOUS, before))
    if aliases.get(CHALLENGER) == version:
        moves.append((CHALLENGER, None))
    why = reason if verdict.passed else f"{reason} (forced; failed gates: {failed})"
    return moves, why, {PROMOTION_TAG: "promoted", REASONS_TAG: why[:5000]}


@contextmanager
def _tagged(registry: ModelRegistry, version: str, tags: dict[str, str]) -> Iterator[None]:
    """The decision's tags on the version before its aliases move (so a moved alias always has
    its reasons); if the move fails, the version's tags are put back as they were."""
    previous_tags = registry.version(version).tags
    stale = [k for k in previous_tags if k.startswith(GATE_TAG_PREFIX) and k not in tags]
    registry.set_tags(version, tags)
    try:
        registry.delete_tags(version, stale)  # an earlier decision's gates this one did not run
        yield
    except BaseException:
        registry.delete_tags(version, [k for k in tags if k not in previous_tags])
        restored = {*tags, *stale}
        registry.set_tags(version, {k: previous_tags[k] for k in restored if k in previous_tags})
        raise


def score_version(registry: ModelRegistry, version: str, frame: pd.DataFrame) -> Scored:
    """A registered version scored on `frame` now (stale tags do not count)."""
    predictor = registry.load(version)
    proba = predictor.predict_proba(frame["text"].tolist())
    answers = np.asarray(predictor.labels)[proba.argmax(axis=1)].tolist()
    scores = Scores.compute(frame, proba, predictor.labels)
    return Scored(version, scores, list(predictor.labels), answers, predictor)


def rescore_champion(
    champion: str | None, score: Callable[[], Scored]
) -> tuple[Scored | None, str | None]:
    """The champion scored now, or why it could not be (missing artifacts, labels that no
    longer match the data...): a reason for the gates, not a crash after registration."""
    if champion is None:
        return None, None
    try:
        return score(), None
    except Exception as exc:
        log.warning("registry: champion %s could not be re-scored: %s", champion, exc)
        return None, f"champion {champion} could not be re-scored on the test split: {exc}"


def paired(candidate: Scored, champion: Scored, frame: pd.DataFrame, cfg: Config) -> gates.Paired:
    """The two versions' answers on the same rows of `frame`, compared by the gates' rule."""
    return gates.compare(
        frame["label"].tolist(),
        candidate.answers,
        champion.answers,
        slice_masks(frame),
        cfg.registry,
        cfg.seed,
        candidate.labels,
        champion.labels,
    )


def judge_version(
    registry: ModelRegistry,
    cfg: Config,
    candidate: Scored,
    p95_ms: float,
    frame: pd.DataFrame,
) -> tuple[gates.Verdict, dict[str, float]]:
    """Every gate on `candidate` against the champion, both scored on `frame`; with the
    champion's headline scores (empty without a champion)."""
    champion = registry.alias(CHAMPION)
    theirs, error = rescore_champion(champion, lambda: score_version(registry, champion, frame))
    comparison = paired(candidate, theirs, frame, cfg) if theirs is not None else None
    verdict = gates.judge(
        gates.Candidate(candidate.version, candidate.scores.metrics.macro_f1, p95_ms),
        comparison,
        cfg.registry,
    )
    if error is not None:
        verdict = replace(
            verdict, checks=[*verdict.checks, Check("champion re-scored", False, error)]
        )
    return verdict, theirs.scores.headline() if theirs is not None else {}


def promote_registered(
    registry: ModelRegistry,
    cfg: Config,
    version: str,
    p95_ms: float,
    frame: pd.DataFrame,
    reason: str,
    actor: str,
) -> Decision:
    """The pipeline's promotion of the version it registered: the gates on it against the
    champion, both scored on `frame`. A version that is champion already (a reused registration,
    promoted by an earlier run) is left as it is; one that was rolled back is not promoted again
    (by hand it can be)."""
    champion = registry.alias(CHAMPION)
    if champion == version:
        return Decision(version, True, [], champion, {})
    if registry.version(version).tags.get(PROMOTION_TAG) == ROLLED_BACK:
        why = (
            f"version {version} was rolled back; the pipeline does not promote it again "
            f"(by hand: flywheel models promote {version})"
        )
        return Decision(version, False, [Check("not rolled back", False, why)], champion, {})
    candidate = score_version(registry, version, frame)
    verdict, champion_scores = judge_version(registry, cfg, candidate, p95_ms, frame)
    return promote(
        registry,
        verdict,
        version,
        candidate.scores.headline(),
        champion_scores,
        cfg.registry,
        reason=reason,
        actor=actor,
    )


def manual_promotion(
    registry: ModelRegistry,
    cfg: Config,
    ref: str,
    frame: pd.DataFrame,
    reason: str,
    force: bool = False,
    *,
    measure: LatencyProbe,
) -> Decision:
    """`flywheel models promote`: the pipeline's gates with both models scored on `frame` and
    the candidate's latency measured now by `measure` (the export stage's `measure_latency`);
    nothing moves when they fail (unless `force`)."""
    actor = cli_actor("promote")
    with registry_lock(cfg.root, actor):  # the champion judged is the one replaced
        info = registry.version(ref)
        if registry.alias(CHAMPION) == info.version:
            raise RegistryError(f"version {info.version} is already champion")
        candidate = score_version(registry, info.version, frame)
        latency = measure(candidate.predictor, frame["text"].tolist()[: cfg.export.latency_texts])
        verdict, champion_scores = judge_version(registry, cfg, candidate, latency.p95_ms, frame)
        return promote(
            registry,
            verdict,
            info.version,
            candidate.scores.headline(),
            champion_scores,
            cfg.registry,
            reason,
            actor,
            force=force,
            challenger_on_fail=False,
        )


def rollback(registry: ModelRegistry, reason: str, actor: str) -> list[AuditEntry]:
    """Champion back to `previous`; the rolled-back version becomes `previous`, so a second
    rollback undoes the first."""
    champion, previous = registry.alias(CHAMPION), registry.alias(PREVIOUS)
    if previous is None:
        raise RegistryError(
            f"{registry.name} has no `previous` version to roll back to "
            f"(champion: {champion or 'none'}); see `flywheel models history`"
        )
    info = registry.version(previous)  # its scores as registered (rollback re-scores nothing)
    scores = {f"test_{m}": info.tag_float(f"flywheel.test.{m}") for m in ("macro_f1", "accuracy")}
    metrics = {name: value for name, value in scores.items() if value is not None}
    # The pipeline does not promote a rolled-back version again by itself (promote_registered).
    # The tags go first, as in promote(), and are put back if the aliases cannot move.
    tags = {
        champion: {PROMOTION_TAG: ROLLED_BACK, REASONS_TAG: reason[:5000]},
        previous: {PROMOTION_TAG: "promoted"},
    }
    before = {v: registry.version(v).tags for v in tags}
    for version, values in tags.items():
        registry.set_tags(version, values)
    try:
        return registry.move([(CHAMPION, previous), (PREVIOUS, champion)], reason, actor, metrics)
    except BaseException:
        for version, values in tags.items():
            registry.delete_tags(version, [k for k in values if k not in before[version]])
            registry.set_tags(
                version, {k: before[version][k] for k in values if k in before[version]}
            )
        raise


@dataclass(frozen=True)
class Comparison:
    """Two versions scored on the same test split."""

    a: str
    b: str
    rows: int
    metrics: dict[str, tuple[float, float]]  # name -> (a, b)
    per_class: dict[str, tuple[float, float]]  # label -> F1 (a, b)
    slices: dict[str, tuple[float, float, int]]  # slice -> accuracy (a, b), rows
    disagree: int  # texts on which the two labels differ
    disagreements: list[dict[str, str]]  # the first `limit` of them: text, label, a, b
    verdict: gates.Verdict  # the gates on B as candidate, A as champion (latency not measured)


def compare_versions(
    registry: ModelRegistry, cfg: Config, a: str, b: str, frame: pd.DataFrame, limit: int = 20
) -> Comparison:
    """Score versions `a` and `b` (numbers or aliases) on `frame`; list where they disagree and
    judge B against A by the promotion gates' paired comparison."""
    va, vb = registry.version(a), registry.version(b)
    texts = frame["text"].tolist()
    sa, sb = (score_version(registry, v.version, frame) for v in (va, vb))
    pred_a, pred_b = np.asarray(sa.answers), np.asarray(sb.answers)
    differ = np.flatnonzero(pred_a != pred_b)
    keys = ("accuracy", "macro_f1", "weighted_f1", "roc_auc", "ece")
    slices_b = {s.slice: s for s in sb.scores.slices}
    verdict = gates.judge(
        gates.Candidate(sb.version, sb.scores.metrics.macro_f1, None),  # latency not measured
        paired(sb, sa, frame, cfg),
        cfg.registry,
    )
    return Comparison(
        va.version,
        vb.version,
        len(frame),
        {k: (getattr(sa.scores.metrics, k), getattr(sb.scores.metrics, k)) for k in keys},
        {
            label: (m.f1, sb.scores.metrics.per_class[label].f1)
            for label, m in sa.scores.metrics.per_class.items()
            if label in sb.scores.metrics.per_class
        },
        {
            s.slice: (s.accuracy, slices_b[s.slice].accuracy, s.rows)
            for s in sa.scores.slices
            if s.slice in slices_b
        },
        len(differ),
        [
            {"text": texts[i], "label": str(frame["label"].iloc[i]), "a": pred_a[i], "b": pred_b[i]}
            for i in differ[:limit]
        ],
        verdict,
    )


def cli_actor(command: str) -> str:
    """Who moved an alias from the command line (the OS user; the uid when it has no name)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container uid without a passwd entry
        user = f"uid {os.getuid()}"
    return f"{user} via flywheel models {command}"
