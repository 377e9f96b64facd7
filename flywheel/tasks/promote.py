"""The promote stage: the version just registered judged against the champion by the promotion
policy (flywheel/promotion.py: both re-scored on the current test split, the gates, the alias
moves), under the registry lock, with the decision logged to the stage's MLflow run. Why:
docs/decisions/0006 and 0012.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import tracking
from flywheel.config import Config
from flywheel.io import read_parquet, write_json
from flywheel.locks import registry_lock
from flywheel.promotion import Decision, promote_registered
from flywheel.registry import PROMOTION_TAG, ModelRegistry
from flywheel.stages import StageSpec

if TYPE_CHECKING:
    from flywheel.tasks.prepare import PrepareResult
    from flywheel.tasks.register import Registered

STAGE = StageSpec(
    name="promote",
    module=__name__,
    reads=("evaluate", "registry"),
    upstream=("register",),
    facts="cache_facts",
)


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(
    cfg: Config,
    prepared: PrepareResult,
    registered: Registered,
    parent: tracking.RunRef,
    actor: str,
) -> Decision:
    """Re-score the champion on the current test split, run the gates, move the aliases."""
    test = read_parquet(prepared.split_paths["test"])
    registry = ModelRegistry(parent.uri, cfg.registry.model_name)
    with tracking.stage_run(cfg, "promote", parent) as run, registry_lock(cfg.root, actor):
        decision = promote_registered(
            registry,
            cfg,
            registered.version,
            registered.p95_ms,
            test,
            reason=f"new version from the pipeline (data {parent.lineage.data_version})",
            actor=actor,
        )
        log_decision(run, decision)
    return decision


def log_decision(run: tracking.RunRef, decision: Decision) -> None:
    """The decision on the stage's run: promoted or not, the champion's scores, decision.json."""
    tracking.log_scalars(
        run,
        {"promoted": float(decision.promoted)}
        | {f"champion_{k}": v for k, v in decision.champion_scores.items()},
    )
    tracking.set_tags(
        run,
        {
            "flywheel.model_version": decision.version,
            PROMOTION_TAG: "promoted" if decision.promoted else "rejected",
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "decision.json"
        write_json(
            path, asdict(decision) | {"reasons": decision.reasons, "gates": decision.gate_lines()}
        )
        tracking.log_artifacts(run, path)
