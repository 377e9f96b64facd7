"""Plan: decide which stages run and which reuse their cached result (flywheel/cache.py).

The plan needs two things from the registry: the champion a new version would be judged
against (promote's key), and whether a cached registration still exists.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import cache, tracking
from flywheel.config import Config
from flywheel.flows.stages import MODEL_STAGES, forced_from
from flywheel.registry import CHAMPION, ModelRegistry, RegistryError
from flywheel.stages import StageSpec

log = logging.getLogger(__name__)


def registry_changed(cfg: Config, stage: str, facts: Mapping[str, str]) -> str | None:
    """Why a cached registration or decision no longer holds, or None: the version was deleted
    or replaced; the champion is not the one the decision left (a rollback, a manual promotion)."""
    uri = tracking.tracking_uri(cfg.root)
    if not tracking.store_exists(cfg.root):
        return f"the MLflow store {tracking.display_uri(uri)} is gone"
    if stage == "promote":
        now = ModelRegistry(uri, cfg.registry.model_name).alias(CHAMPION) or "none"
        if now != facts["champion"]:
            return f"champion is {now}, not {facts['champion']} as this decision left it"
        return None
    registry = ModelRegistry(uri, facts["model"])
    try:
        info = registry.version(facts["version"])
    except RegistryError:
        return f"{facts['model']} version {facts['version']} is no longer registered"
    if info.run_id != facts["run_id"]:
        return f"{facts['model']} version {facts['version']} is another model now"
    return None


def plan(
    cfg: Config,
    data: str,
    stages: Sequence[StageSpec],
    *,
    force_from: str | None = None,
    flow_run: str | None = None,
) -> cache.Plan:
    """The plan of `stages` on input data hashed `data` (raw md5 or data version)."""
    state = {}
    if any(s.name == "promote" for s in stages):
        champion = None
        if tracking.store_exists(cfg.root):  # a dry run must not create the store
            uri = tracking.tracking_uri(cfg.root)
            champion = ModelRegistry(uri, cfg.registry.model_name).alias(CHAMPION)
        state["promote"] = {"champion": champion or "none"}
    return cache.make_plan(
        cfg,
        data,
        stages,
        forced=forced_from(force_from),
        force_from=force_from,
        state=state,
        check_facts=lambda stage, facts: registry_changed(cfg, stage, facts),
        flow_run=flow_run,
    )


def model_stages(promote: bool) -> list[StageSpec]:
    """The model stages of a run; a one-off data run does not promote."""
    return [s for s in MODEL_STAGES if promote or s.name != "promote"]


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(
    cfg: Config,
    data: str,
    stages: Sequence[StageSpec],
    force_from: str | None,
    flow_run: str | None,
) -> cache.Plan:
    """Prefect task: the plan, logged as a table."""
    result = plan(cfg, data, stages, force_from=force_from, flow_run=flow_run)
    log.info("plan:\n%s", result.table())
    return result
