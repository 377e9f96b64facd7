"""Plan: decide which model stages run and which reuse their cached result (flywheel/cache.py).

The plan needs two things from the registry: the champion a new version would be judged
against (promote's key), and whether a cached registration still exists.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import cache, tracking
from flywheel.config import Config, changes_data, load_config, with_run_outputs
from flywheel.tasks.collect import collect
from flywheel.tasks.prepare import prepare
from flywheel.tasks.registry import CHAMPION, ModelRegistry, RegistryError
from flywheel.tasks.validate import validate
from flywheel.tasks.version import dir_md5

log = logging.getLogger(__name__)


def registry_changed(cfg: Config, stage: cache.Stage, facts: Mapping[str, str]) -> str | None:
    """Why a cached registration or decision no longer holds, or None: the version was deleted
    or replaced; the champion is not the one the decision left (a rollback, a manual promotion)."""
    uri = tracking.tracking_uri(cfg.root)
    if not tracking.store_exists(cfg.root):
        return f"the MLflow store {tracking.display_uri(uri)} is gone"
    if stage is cache.Stage.PROMOTE:
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
    stages: Sequence[cache.Stage],
    *,
    force_from: cache.Stage | None = None,
    flow_run: str | None = None,
) -> cache.Plan:
    """The plan of `stages` on input data hashed `data` (raw md5 or data version)."""
    state = {}
    if cache.Stage.PROMOTE in stages:
        champion = None
        if tracking.store_exists(cfg.root):  # a dry run must not create the store
            uri = tracking.tracking_uri(cfg.root)
            champion = ModelRegistry(uri, cfg.registry.model_name).alias(CHAMPION)
        state[cache.Stage.PROMOTE] = {"champion": champion or "none"}
    return cache.make_plan(
        cfg,
        data,
        stages,
        force_from=force_from,
        state=state,
        check_facts=lambda stage, facts: registry_changed(cfg, stage, facts),
        flow_run=flow_run,
    )


def model_stages(promote: bool) -> list[cache.Stage]:
    """The model stages of a run; a one-off data run does not promote."""
    return [s for s in cache.MODEL_STAGES if promote or s is not cache.Stage.PROMOTE]


def preview(
    params_path: Path,
    overrides: Mapping[str, Any] | None = None,
    profile: str | None = None,
    force_from: cache.Stage | None = None,
    data_only: bool = False,
) -> tuple[str, cache.Plan]:
    """What `flywheel run` would do, writing nothing to the project: collect (and, unless their
    cached results hold, validate and prepare) run into a temporary folder; the hash of what
    prepare writes is the data version the run would get. Returns it and the plan."""
    overrides = dict(overrides or {})
    cfg = load_config(params_path, with_run_outputs(overrides), profile=profile)
    with tempfile.TemporaryDirectory(prefix="flywheel-dry-run-") as tmp:
        scratch = {"data.raw_path": f"{tmp}/raw/raw.parquet"}
        scratch_cfg = load_config(
            params_path, {**with_run_outputs(overrides), **scratch}, profile=profile
        )
        collected = collect(scratch_cfg)
        data_plan = plan(cfg, collected.raw_md5, cache.DATA_STAGES, force_from=force_from)
        if data_plan.steps[cache.Stage.PREPARE].runs:
            report_dir = {"validate.report_dir": f"{tmp}/validation"}
            scratch_cfg = load_config(
                params_path,
                {**with_run_outputs(overrides), **scratch, **report_dir},
                profile=profile,
            )
            validate(scratch_cfg, collected.raw_path)
            prepared = prepare(scratch_cfg, collected.raw_path, Path(tmp) / "prepared")
            data_version = dir_md5(prepared.prepared_dir)
        else:
            data_version = dir_md5(cfg.resolve(cfg.split.prepared_dir))
    if data_only:
        return data_version, data_plan
    stages = model_stages(promote=not changes_data(overrides))
    model_plan = plan(cfg, data_version, stages, force_from=force_from)
    return data_version, data_plan.then(model_plan)


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(
    cfg: Config,
    data: str,
    stages: Sequence[cache.Stage],
    force_from: cache.Stage | None,
    flow_run: str | None,
) -> cache.Plan:
    """Prefect task: the plan, logged as a table."""
    result = plan(cfg, data, stages, force_from=force_from, flow_run=flow_run)
    log.info("plan:\n%s", result.table())
    return result
