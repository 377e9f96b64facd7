"""The retrain trigger: is there enough new evidence against the champion to retrain?

Evidence, all since the champion's training data (its `flywheel.feedback_seq` watermark, the
newest feedback row its data version holds):

    feedback count     new feedback rows >= retrain.min_feedback
    feedback accuracy  the champion's accuracy on them < retrain.min_feedback_accuracy
                       (judged with at least retrain.min_feedback_for_accuracy rows)
    drift              served traffic vs the champion's reference profile (tasks/monitor.py):
                       PSI of lengths or confidences > retrain.max_psi, predicted-label shift >
                       retrain.max_label_shift, OOV share up by > retrain.max_oov_drift

Any crossed bound fires, unless the last firing was within retrain.cooldown_minutes or saw the
same evidence (no feedback or prediction newer than it had): one piece of evidence fires once.
The decision is pure (`decide`); gathering it (`gather`) reads the registry, the feedback
store and the prediction log; the last firing is kept in .flywheel/retrain/last-firing.json.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import feedback, predictions
from flywheel.config import Config, RetrainConfig
from flywheel.io import write_json
from flywheel.tasks.monitor import Drift, MonitorError, monitor
from flywheel.tasks.registry import CHAMPION, ModelRegistry
from flywheel.tracking import FEEDBACK_SEQ_TAG

log = logging.getLogger(__name__)

STATE_FILE = Path(".flywheel/retrain/last-firing.json")
SCORED_FEEDBACK = 5000  # the champion is scored on at most this many of the newest rows


@dataclass(frozen=True)
class Evidence:
    """What the trigger judges; None where there is nothing to measure."""

    champion: str | None
    watermark: int  # newest feedback seq in the champion's data
    newest_feedback: int  # newest feedback seq in the store
    new_feedback: int  # rows after the watermark
    feedback_accuracy: float | None  # the champion on (the newest of) those rows
    feedback_scored: int
    drift: Drift | None
    drift_note: str | None = None  # why there is no drift figure
    newest_prediction: int = 0  # newest logged prediction seq of the champion

    def fingerprint(self) -> dict[str, object]:
        """What makes evidence new: another champion, newer feedback, newer predictions."""
        return {
            "champion": self.champion,
            "feedback_seq": self.newest_feedback,
            "prediction_seq": self.newest_prediction,
        }


@dataclass(frozen=True)
class Check:
    name: str
    value: str
    bound: str
    crossed: bool
    note: str = ""


@dataclass(frozen=True)
class Firing:
    """The last time the trigger fired, and on what."""

    at: str  # ISO time, UTC
    evidence: dict[str, object]


@dataclass(frozen=True)
class TriggerDecision:
    fire: bool
    checks: list[Check]
    blocked: str | None  # why crossed bounds did not fire (cool-down, same evidence)
    forced: bool
    evidence: Evidence
    decided_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def reasons(self) -> list[str]:
        return [f"{c.name}: {c.value} (bound {c.bound})" for c in self.checks if c.crossed]

    def headline(self) -> str:
        if self.evidence.champion is None:
            return "no champion: nothing to judge (run `flywheel run`)"
        if self.forced:
            return "retrain forced (flywheel retrain without --if-needed)"
        if self.fire:
            return "retrain fired: " + "; ".join(self.reasons)
        if self.blocked:
            return f"not fired: {self.blocked}"
        return "not fired: every bound holds"

    def markdown(self) -> str:
        """The decision as the Prefect artifact shows it."""
        e = self.evidence
        rows = "\n".join(
            f"| {c.name} | {c.value} | {c.bound} | {'**crossed**' if c.crossed else 'holds'} "
            f"| {c.note} |"
            for c in self.checks
        )
        return (
            f"# Retrain check: {'FIRED' if self.fire else 'not fired'}\n\n{self.headline()}\n\n"
            f"Champion: version {e.champion or '-'}, trained on feedback up to seq "
            f"{e.watermark}; the store holds up to seq {e.newest_feedback}.\n\n"
            "| check | value | bound | state | note |\n|---|---|---|---|---|\n"
            f"{rows}\n\nDecided at {self.decided_at}."
        )


def decide(
    evidence: Evidence,
    rc: RetrainConfig,
    last: Firing | None,
    now: datetime,
    force: bool = False,
) -> TriggerDecision:
    """Which bounds the evidence crosses, and whether that fires (pure)."""
    checks = [
        Check(
            "feedback count",
            f"{evidence.new_feedback:,} new rows",
            f">= {rc.min_feedback:,}",
            evidence.new_feedback >= rc.min_feedback,
        )
    ]
    accuracy = evidence.feedback_accuracy
    judged = accuracy is not None and evidence.feedback_scored >= rc.min_feedback_for_accuracy
    checks.append(
        Check(
            "feedback accuracy",
            "-" if accuracy is None else f"{accuracy:.3f} on {evidence.feedback_scored:,} rows",
            f"< {rc.min_feedback_accuracy:g}",
            judged and accuracy < rc.min_feedback_accuracy,
            "" if judged else f"not judged (fewer than {rc.min_feedback_for_accuracy} rows)",
        )
    )
    drift = evidence.drift
    if drift is None or not drift.judged:
        note = evidence.drift_note or (
            f"not judged ({drift.rows} predictions in the window)" if drift else "no drift data"
        )
        checks.append(Check("drift", "-", "see retrain.max_*", False, note))
    else:
        exceeded = drift.exceeded(rc)
        value = (
            f"PSI length {drift.length_psi:.3f}, confidence {drift.confidence_psi:.3f}; "
            f"label shift {drift.label_shift:.3f}; OOV {drift.oov_drift:+.3f}"
        )
        bound = f"PSI > {rc.max_psi:g}, shift > {rc.max_label_shift:g}, OOV > +{rc.max_oov_drift:g}"
        checks.append(
            Check(
                "drift", value, bound, bool(exceeded), "; ".join(exceeded) or f"{drift.rows} rows"
            )
        )
    crossed = any(c.crossed for c in checks)
    blocked = None
    if evidence.champion is None:
        blocked = "no champion"
    elif crossed and last is not None and not force:
        since = now - datetime.fromisoformat(last.at)
        if since < timedelta(minutes=rc.cooldown_minutes):
            blocked = (
                f"cool-down: fired {since.total_seconds() / 60:.0f} min ago at {last.at} "
                f"(retrain.cooldown_minutes {rc.cooldown_minutes:g})"
            )
        elif last.evidence == evidence.fingerprint():
            blocked = f"same evidence as the firing at {last.at} (nothing newer since)"
    fire = evidence.champion is not None and (force or (crossed and blocked is None))
    return TriggerDecision(fire, checks, blocked if crossed else None, force, evidence)


def feedback_accuracy(registry: ModelRegistry, version: str, rows: pd.DataFrame) -> float | None:
    """The version's accuracy on feedback rows (text, label); None for no rows."""
    if rows.empty:
        return None
    answers = registry.load(version).predict(rows["text"].tolist())
    return float(np.mean([a.label == y for a, y in zip(answers, rows["label"], strict=True)]))


def gather(cfg: Config) -> Evidence:
    """The evidence against the champion now."""
    registry = ModelRegistry.of(cfg)
    champion = registry.alias(CHAMPION)
    store = cfg.resolve(cfg.data.feedback.path)
    everything = feedback.read(store)
    newest = int(everything["seq"].max()) if len(everything) else 0
    if champion is None:
        return Evidence(None, 0, newest, 0, None, 0, None, "no champion")
    watermark = int(registry.version(champion).tags.get(FEEDBACK_SEQ_TAG) or 0)
    new = everything[everything["seq"] > watermark]
    scored = new.tail(SCORED_FEEDBACK)
    accuracy = feedback_accuracy(registry, champion, scored)
    drift, note = None, None
    try:
        drift, _ = monitor(cfg, champion)
    except MonitorError as exc:
        note = str(exc)
    logged = predictions.read(cfg.resolve(cfg.monitor.predictions_path), champion, limit=1)
    return Evidence(
        champion,
        watermark,
        newest,
        len(new),
        accuracy,
        len(scored),
        drift,
        note,
        int(logged["seq"].iloc[-1]) if len(logged) else 0,
    )


def last_firing(root: Path) -> Firing | None:
    path = root / STATE_FILE
    return Firing(**json.loads(path.read_text())) if path.is_file() else None


def record_firing(root: Path, decision: TriggerDecision) -> None:
    """Written whole or not at all (a torn file would stop every later check)."""
    path = root / STATE_FILE
    partial = path.with_suffix(".tmp")
    write_json(partial, asdict(Firing(decision.decided_at, decision.evidence.fingerprint())))
    partial.replace(path)


@task(name="retrain-check", cache_policy=NO_CACHE)
def check_task(cfg: Config, force: bool = False) -> TriggerDecision:
    """Gather the evidence and decide; a firing is recorded before anything runs."""
    evidence = gather(cfg)
    decision = decide(evidence, cfg.retrain, last_firing(cfg.root), datetime.now(UTC), force)
    if decision.fire:
        record_firing(cfg.root, decision)
    log.info("retrain check: %s", decision.headline())
    return decision
