"""The data half of a run, collect -> plan -> validate -> prepare -> version, written once: the
pipeline flow runs it through Prefect tasks and the cache, `flywheel run --dry-run` through
plain calls into a scratch folder (nothing in the project written)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.cache import Plan
from flywheel.config import Config, changes_data, load_config, with_run_outputs
from flywheel.flows.plan import model_stages, plan, plan_task
from flywheel.flows.stages import DATA_STAGES, run_stage
from flywheel.stages import StageSpec
from flywheel.tasks.collect import CollectResult, collect, collect_task
from flywheel.tasks.prepare import PrepareResult, prepare, prepare_task
from flywheel.tasks.validate import ValidationReport, validate, validate_task
from flywheel.tasks.version import DataVersion, dir_md5, version_task


@dataclass(frozen=True)
class DataRunner:
    """How the data half's stages are called: as Prefect tasks through the cache (a run), or as
    plain functions into a scratch folder (`flywheel run --dry-run`)."""

    collect: Callable[[Config], CollectResult]
    plan: Callable[[Config, str, Sequence[StageSpec], str | None, str | None], Plan]
    validate: Callable[[Plan, Config, CollectResult], ValidationReport | None]
    prepare: Callable[[Plan, Config, CollectResult, ValidationReport | None], PrepareResult | None]
    version: Callable[[Config, PrepareResult | None], DataVersion]


@dataclass(frozen=True)
class DataHalf:
    collected: CollectResult
    plan: Plan
    validation: ValidationReport | None  # None: a dry run that keeps the prepared data
    prepared: PrepareResult | None
    version: DataVersion


def data_half(cfg: Config, force_from: str | None, run_id: str | None, run: DataRunner) -> DataHalf:
    """collect -> plan -> validate (GX gate) -> prepare -> version: the run's data version."""
    collected = run.collect(cfg)
    plan = run.plan(cfg, collected.raw_md5, DATA_STAGES, force_from, run_id)
    validation = run.validate(plan, cfg, collected)
    prepared = run.prepare(plan, cfg, collected, validation)
    return DataHalf(collected, plan, validation, prepared, run.version(cfg, prepared))


def flow_runner(pipeline_run: bool) -> DataRunner:
    """The data half as the flow runs it: tasks, cached stages reused by their keys."""
    return DataRunner(
        collect=collect_task,
        plan=plan_task,
        validate=lambda plan, cfg, collected: run_stage(plan, validate_task, cfg, collected),
        prepare=lambda plan, cfg, collected, checked: run_stage(
            plan, prepare_task, cfg, collected, checked
        ),
        version=lambda cfg, prepared: version_task(cfg, prepared, pipeline_run=pipeline_run),
    )


def dry_runner(scratch_cfg: Config, scratch: Path) -> DataRunner:
    """The data half without writing to the project: collect (and, unless their cached results
    hold, validate and prepare) run into `scratch`; the data version is the hash of what
    prepare writes there, or of the prepared data in place when it would be reused."""

    def validate_(plan: Plan, cfg: Config, collected: CollectResult) -> ValidationReport | None:
        return validate(scratch_cfg, collected.raw_path) if plan.runs("prepare") else None

    def prepare_(
        plan: Plan, cfg: Config, collected: CollectResult, checked: ValidationReport | None
    ) -> PrepareResult | None:
        if checked is None:
            return None
        return prepare(scratch_cfg, collected.raw_path, scratch / "prepared")

    def version_(cfg: Config, prepared: PrepareResult | None) -> DataVersion:
        folder = prepared.prepared_dir if prepared else cfg.resolve(cfg.split.prepared_dir)
        return DataVersion(dir_md5(folder), None, 0, None, "dry run: not recorded")

    return DataRunner(
        collect=lambda cfg: collect(scratch_cfg),
        plan=lambda cfg, data, stages, force_from, run_id: plan(
            cfg, data, stages, force_from=force_from
        ),
        validate=validate_,
        prepare=prepare_,
        version=version_,
    )


def dry_run(
    params_path: Path,
    overrides: Mapping[str, Any] | None = None,
    profile: str | None = None,
    force_from: str | None = None,
    data_only: bool = False,
) -> tuple[str, Plan]:
    """What `flywheel run` would do, writing nothing to the project: the data version the run
    would get and the plan of its stages."""
    overrides = dict(overrides or {})
    cfg = load_config(params_path, with_run_outputs(overrides), profile=profile)
    with tempfile.TemporaryDirectory(prefix="flywheel-dry-run-") as tmp:
        scratch = {"data.raw_path": f"{tmp}/raw/raw.parquet", "validate.report_dir": f"{tmp}/v"}
        scratch_cfg = load_config(
            params_path, {**with_run_outputs(overrides), **scratch}, profile=profile
        )
        half = data_half(cfg, force_from, None, dry_runner(scratch_cfg, Path(tmp)))
    data_version = half.version.data_version
    if data_only:
        return data_version, half.plan
    stages = model_stages(promote=not changes_data(overrides))
    return data_version, half.plan.then(plan(cfg, data_version, stages, force_from=force_from))
