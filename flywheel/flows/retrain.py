"""The retrain flow: in the retrain slot, check the evidence against the champion (trigger.py)
and, when it fires, run the pipeline with the feedback merged into the data.

A firing with no new feedback row that collect would take only alerts ("no new data"). The
decision and the outcome are Prefect artifacts; the outcome is kept for the next check.
Behaviour: docs/serving.md; why: docs/decisions/0009-serving-feedback-and-retrain-trigger.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flywheel.config import DEFAULT_PARAMS, ConfigError, load_config
from flywheel.flows.limits import retrain_slot
from flywheel.flows.pipeline import pipeline
from flywheel.flows.result import PipelineResult, summary_lines
from flywheel.trigger import (
    ALREADY_CHAMPION,
    FAILED,
    NO_NEW_DATA,
    NOT_PROMOTED,
    PROMOTED,
    TriggerDecision,
    check,
    finish_firing,
    start_firing,
)

check_task = task(name="retrain-check", cache_policy=NO_CACHE)(check)

DECISION_ARTIFACT = "flywheel-retrain-decision"
OUTCOME_ARTIFACT = "flywheel-retrain-outcome"


@dataclass(frozen=True)
class RetrainResult:
    decision: TriggerDecision
    pipeline: PipelineResult | None = None  # None: not fired, or nothing to train on

    @property
    def promoted(self) -> bool:
        return self.outcome == PROMOTED

    @property
    def outcome(self) -> str | None:
        """How the firing ended (None: it did not fire)."""
        if self.decision.nothing_to_train:
            return NO_NEW_DATA
        decision = self.pipeline.promotion if self.pipeline is not None else None
        if decision is None:
            return None
        if decision.already_champion:
            return ALREADY_CHAMPION
        return PROMOTED if decision.promoted else NOT_PROMOTED


def outcome_markdown(result: PipelineResult) -> str:
    """The retrain's outcome: the run summary's data, registration and promotion lines, then
    every gate with its figures."""
    lines = summary_lines(result)
    keep = ("collect", "feedback", "data version", "register", "promote")
    out = ["# Retrain outcome", "", *(f"- {k}: {lines[k]}" for k in keep if k in lines)]
    if result.promotion is not None:
        out += [f"  - {line}" for line in result.promotion.gate_lines()]
    return "\n".join(out)


@flow(name="flywheel-retrain", log_prints=True, validate_parameters=True)
def retrain(params_path: Path = DEFAULT_PARAMS, if_needed: bool = True) -> RetrainResult:
    """Check whether feedback or drift calls for a retrain; if so (or if not `if_needed`),
    run the pipeline on the data with the feedback merged in."""
    cfg = load_config(params_path)
    if not cfg.data.feedback.enabled:
        raise ConfigError(
            f"{params_path}: data.feedback.enabled is false, so a retrain would not see the "
            "feedback: set it to true"
        )
    with retrain_slot(cfg.root) as held:
        decision = check_task(cfg, force=not if_needed, busy=not held)
        create_markdown_artifact(
            decision.markdown(), key=DECISION_ARTIFACT, description=decision.headline()
        )
        print(decision.headline())
        if not decision.fire:
            return RetrainResult(decision)
        start_firing(cfg.root, decision)
        if decision.nothing_to_train:
            finish_firing(cfg.root, NO_NEW_DATA, reasons=[decision.headline()])
            return RetrainResult(decision)
        try:
            result = pipeline(params_path=params_path)
        except BaseException:
            finish_firing(cfg.root, FAILED)  # tried again after the cool-down
            raise
        retrained = RetrainResult(decision, result)
        promotion = result.promotion
        reasons = promotion.reasons if promotion is not None else []
        finish_firing(cfg.root, retrained.outcome or FAILED, result.collect.feedback_seq, reasons)
    create_markdown_artifact(
        outcome_markdown(result), key=OUTCOME_ARTIFACT, description=f"Retrain: {retrained.outcome}"
    )
    print(f"retrain outcome: {retrained.outcome}")
    return retrained
