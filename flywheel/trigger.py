"""The retrain trigger: is there enough new evidence against the champion to retrain?

`gather` collects the evidence since the champion's `flywheel.feedback_seq` watermark (feedback
count, the champion's accuracy on it, drift); the pure `decide` judges it against `retrain.*`,
the cool-down and the same-evidence rule; the last firing and its outcome are kept in
.flywheel/retrain/last-firing.json. The rules: docs/serving.md; why:
docs/decisions/0009-serving-feedback-and-retrain-trigger.md.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from flywheel import feedback
from flywheel.config import Config, RetrainConfig
from flywheel.drift import Drift, MonitorError, monitor
from flywheel.errors import FlywheelError
from flywheel.io import write_json_atomic
from flywheel.registry import CHAMPION, ModelRegistry
from flywheel.sources import screen_feedback
from flywheel.tables import markdown_table
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
    # of the new rows, those the next collect would take (not quarantined, not repeats);
    # None: not screened (then every new row counts)
    usable_feedback: int | None = None

    @property
    def newest_prediction(self) -> int:
        """The newest logged prediction seq of the champion (the drift window ends there)."""
        return self.drift.last_seq if self.drift is not None else 0

    @property
    def window_first_prediction(self) -> int:
        """The seq of the oldest prediction in the drift window."""
        return self.drift.first_seq if self.drift is not None else 0

    def fingerprint(self) -> dict[str, object]:
        """What makes evidence new: another champion, newer feedback, newer predictions."""
        return {
            "champion": self.champion,
            "feedback_seq": self.newest_feedback,
            "prediction_seq": self.newest_prediction,
        }


FEEDBACK_COUNT, FEEDBACK_ACCURACY, DRIFT = "feedback count", "feedback accuracy", "drift"


@dataclass(frozen=True)
class Check:
    name: str  # FEEDBACK_COUNT, FEEDBACK_ACCURACY or DRIFT
    value: str
    bound: str
    crossed: bool
    note: str = ""


# How a firing ended. PROMOTED, NOT_PROMOTED, ALREADY_CHAMPION: the pipeline ran and the gates
# decided (already champion: the data gave the champion's own model back); NO_NEW_DATA: fired
# on drift with no labelled row to train on, so the pipeline did not run (an alert); FAILED:
# tried again after the cool-down. UNRECORDED: a record from before outcomes were kept, taken
# as a retrain that ended.
PROMOTED, NOT_PROMOTED, ALREADY_CHAMPION = "promoted", "not promoted", "already champion"
RUNNING, FAILED, NO_NEW_DATA, UNRECORDED = "running", "failed", "no new data", "unrecorded"
NOTHING_TO_TRAIN = "drift without new labelled data: nothing new to train on"


@dataclass(frozen=True)
class Firing:
    """The last time the trigger fired, on what, and how the retrain it started ended."""

    at: str  # ISO time, UTC
    evidence: dict[str, object]  # Evidence.fingerprint()
    outcome: str = RUNNING  # RUNNING (or interrupted) or how it ended (see PROMOTED ...)
    finished_at: str | None = None
    reasons: list[str] = field(default_factory=list)  # why it was not promoted, if it was not


class TriggerStateError(FlywheelError):
    """The record of the last firing cannot be read; the message names the file."""


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

    @property
    def nothing_to_train(self) -> bool:
        """Fired (on drift) with no feedback row newer than the champion's data that the next
        collect would take (quarantined rows and repeats do not count): retraining would train
        on the champion's own data again, so the firing is an alert only."""
        e = self.evidence
        usable = e.new_feedback if e.usable_feedback is None else e.usable_feedback
        return self.fire and not self.forced and usable == 0

    def headline(self) -> str:
        if self.evidence.champion is None:
            return "no champion: nothing to judge (run `flywheel run`)"
        if self.fire and self.forced:
            return "retrain forced (flywheel retrain without --if-needed)"
        if self.nothing_to_train:
            e = self.evidence
            unusable = e.new_feedback - (e.usable_feedback or 0)
            held = f"; {unusable:,} new feedback rows quarantined or repeats" if unusable else ""
            return (
                f"{NOTHING_TO_TRAIN} (alert: {'; '.join(self.reasons)}{held}); send labelled "
                "feedback to /feedback, or add labelled rows to a source and `flywheel run`"
            )
        if self.fire:
            return "retrain fired: " + "; ".join(self.reasons)
        if self.blocked:
            return f"not fired: {self.blocked}"
        return "not fired: every bound holds"

    def markdown(self) -> str:
        """The decision as the Prefect artifact shows it."""
        e = self.evidence
        rows = [
            [c.name, c.value, c.bound, "**crossed**" if c.crossed else "holds", c.note]
            for c in self.checks
        ]
        table = markdown_table(["check", "value", "bound", "state", "note"], rows)
        state = "FIRED" if self.fire else "not fired"
        if self.nothing_to_train:
            state = "ALERT (no retrain)"
        return (
            f"# Retrain check: {state}\n\n{self.headline()}\n\n"
            f"Champion: version {e.champion or '-'}, trained on feedback up to seq "
            f"{e.watermark}; the store holds up to seq {e.newest_feedback}.\n\n"
            f"{table}\n\nDecided at {self.decided_at}."
        )


def decide(
    evidence: Evidence,
    rc: RetrainConfig,
    last: Firing | None,
    now: datetime,
    force: bool = False,
    busy: bool = False,
) -> TriggerDecision:
    """Which bounds the evidence crosses, and whether that fires (pure). `busy`: another
    retrain holds the slot; `force`: fire whatever the evidence (but not while busy)."""
    checks = [
        Check(
            FEEDBACK_COUNT,
            f"{evidence.new_feedback:,} new rows",
            f">= {rc.min_feedback:,}",
            evidence.new_feedback >= rc.min_feedback,
        )
    ]
    accuracy = evidence.feedback_accuracy
    judged = accuracy is not None and evidence.feedback_scored >= rc.min_feedback_for_accuracy
    checks.append(
        Check(
            FEEDBACK_ACCURACY,
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
        checks.append(Check(DRIFT, "-", "see retrain.max_*", False, note))
    else:
        exceeded = drift.exceeded(rc)
        value = (
            f"PSI length {drift.length_psi:.3f}, confidence {drift.confidence_psi:.3f}; "
            f"label shift {drift.label_shift:.3f}; OOV {drift.oov_drift:+.3f}"
        )
        bound = f"PSI > {rc.max_psi:g}, shift > {rc.max_label_shift:g}, OOV > +{rc.max_oov_drift:g}"
        checks.append(
            Check(DRIFT, value, bound, bool(exceeded), "; ".join(exceeded) or f"{drift.rows} rows")
        )
    crossed = [c for c in checks if c.crossed]
    blocked = None
    if evidence.champion is None:
        blocked = "no champion"
    elif busy:
        blocked = "another retrain is running (it holds the retrain slot)"
    elif crossed and last is not None and not force:
        blocked = held_back_by(last, evidence, crossed, rc, now)
    fire = blocked is None and (force or bool(crossed))
    shown = blocked if crossed or force or busy else None  # "no champion" has its own headline
    return TriggerDecision(fire, checks, shown, force, evidence)


def held_back_by(
    last: Firing, evidence: Evidence, crossed: list[Check], rc: RetrainConfig, now: datetime
) -> str | None:
    """Why crossed bounds do not fire given the last firing (cool-down, same evidence), or None.

    Called while holding the retrain slot, so a firing still RUNNING was interrupted."""
    ended = datetime.fromisoformat(last.finished_at or last.at)
    since = now - ended
    if since < timedelta(minutes=rc.cooldown_minutes):
        what = "the last retrain ended" if last.finished_at else "the last retrain fired"
        return (
            f"cool-down: {what} {since.total_seconds() / 60:.0f} min ago at {ended.isoformat()} "
            f"(retrain.cooldown_minutes {rc.cooldown_minutes:g})"
        )
    if last.outcome in (RUNNING, FAILED) or last.evidence.get("champion") != evidence.champion:
        return None  # a retrain to try again, or a new champion to judge
    seen_feedback = int(last.evidence.get("feedback_seq") or 0)
    seen_prediction = int(last.evidence.get("prediction_seq") or 0)
    since_feedback = evidence.newest_feedback - seen_feedback
    fresh = {
        FEEDBACK_COUNT: since_feedback >= rc.min_feedback,
        FEEDBACK_ACCURACY: since_feedback >= rc.min_feedback_for_accuracy,
        DRIFT: evidence.window_first_prediction > seen_prediction,
    }
    if any(fresh[c.name] for c in crossed):
        return None
    return (
        f"same evidence as the retrain fired at {last.at} ({last.outcome}): "
        f"{since_feedback:,} feedback rows and no drift window wholly logged since"
    )


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
    screened = screen_feedback(cfg, everything)
    usable = int(((screened["seq"] > watermark) & (screened["status"] == feedback.ACCEPTED)).sum())
    scored = new.tail(SCORED_FEEDBACK)
    accuracy = feedback_accuracy(registry, champion, scored)
    drift, note = None, None
    try:
        drift, _ = monitor(cfg, champion)
    except MonitorError as exc:
        note = str(exc)
    return Evidence(
        champion, watermark, newest, len(new), accuracy, len(scored), drift, note, usable
    )


def last_firing(root: Path) -> Firing | None:
    """The record of the last firing, checked; None when there is none."""
    path = root / STATE_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        if "outcome" not in raw:  # written before outcomes were recorded: take it as ended
            raw |= {"outcome": UNRECORDED, "finished_at": raw.get("at")}
        firing = Firing(**raw)
        if not isinstance(firing.evidence, dict):
            raise ValueError("evidence is not a JSON object")
        if not isinstance(firing.reasons, list):
            raise ValueError("reasons is not a list")
        if not isinstance(firing.at, str):
            raise ValueError(f"at is {firing.at!r}, not a time")
        for stamp in (firing.at, firing.finished_at):
            if stamp is not None and datetime.fromisoformat(stamp).tzinfo is None:
                raise ValueError(f"time {stamp!r} has no time zone")
    except (ValueError, TypeError) as exc:
        raise TriggerStateError(
            f"{path}: not a record of the last retrain firing ({exc}); delete the file to "
            "forget the last firing (the cool-down and same-evidence rules start afresh)"
        ) from None
    return firing


def write_firing(root: Path, firing: Firing) -> None:
    """Written whole or not at all (a torn file would stop every later check)."""
    write_json_atomic(root / STATE_FILE, asdict(firing))


def start_firing(root: Path, decision: TriggerDecision) -> None:
    """Record a firing (outcome RUNNING) before its retrain starts."""
    write_firing(root, Firing(decision.decided_at, decision.evidence.fingerprint()))


def finish_firing(
    root: Path, outcome: str, feedback_seq: int | None = None, reasons: list[str] | None = None
) -> None:
    """Record how the retrain of the last firing ended (see PROMOTED ... FAILED), with the
    reasons when it was not promoted; `feedback_seq`: the newest feedback row the retrain read,
    which may be newer than the one the check saw (rows that came in meanwhile are evidence
    already used)."""
    last = last_firing(root)
    if last is None:
        return
    evidence = dict(last.evidence)
    if feedback_seq is not None:
        evidence["feedback_seq"] = max(int(evidence.get("feedback_seq") or 0), feedback_seq)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    write_firing(
        root,
        replace(
            last, evidence=evidence, outcome=outcome, finished_at=now, reasons=list(reasons or [])
        ),
    )


def check(cfg: Config, force: bool = False, busy: bool = False) -> TriggerDecision:
    """Gather the evidence and decide (the retrain flow records a firing: start_firing)."""
    last = last_firing(cfg.root)
    decision = decide(gather(cfg), cfg.retrain, last, datetime.now(UTC), force, busy)
    log.info("retrain check: %s", decision.headline())
    return decision
