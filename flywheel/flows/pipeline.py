"""The Flywheel pipeline as a Prefect flow: composition only, stage logic lives in tasks/.

    collect -> validate (GX gate) -> prepare (clean + split) -> version (DVC)
            -> baseline (TF-IDF) -> train (fine-tune) -> evaluate (test split, vs baseline)
            -> export (ONNX, int8 search on val, parity gate on test)
            -> register (MLflow model registry) -> promote (gates: champion or challenger)
            -> report (Prefect artifacts: run summary, per-class metrics)

Collect always runs (reading the sources is how new data shows). Every later stage but version
and report is cached (flywheel/cache.py, docs/decisions/0007): once its input is known (the raw
table's md5, then the data version) a plan says per stage whether to run or reuse and why.
The whole run, collect through report, holds the project's run lock (flows/limits.py): runs of
one project, whatever starts them, run one after the other. The model stages run inside one
MLflow parent run (flywheel/tracking.py).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flywheel import tracking
from flywheel.cache import Plan
from flywheel.config import DEFAULT_PARAMS, Config, changes_data, load_config, with_run_outputs
from flywheel.flows.limits import run_lock
from flywheel.flows.plan import model_stages, plan, plan_task
from flywheel.flows.report import report_failure, report_task
from flywheel.flows.result import PipelineResult
from flywheel.flows.stages import DATA_STAGES, Stage, run_stage
from flywheel.stages import StageSpec
from flywheel.tasks.baseline import baseline_task
from flywheel.tasks.collect import CollectResult, collect, collect_task
from flywheel.tasks.evaluate import evaluate_task
from flywheel.tasks.export import export_task
from flywheel.tasks.prepare import PrepareResult, prepare, prepare_task
from flywheel.tasks.promote import promote_task
from flywheel.tasks.register import register_task
from flywheel.tasks.train import train_task
from flywheel.tasks.validate import ValidationReport, validate, validate_task
from flywheel.tasks.version import DataVersion, dir_md5, version_task


@flow(
    name="flywheel-pipeline",
    log_prints=True,
    validate_parameters=True,
    on_failure=[report_failure],  # the cause and what finished, as an artifact and a log
)
def pipeline(
    params_path: Path = DEFAULT_PARAMS,
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
    force_from: Stage | None = None,
    data_only: bool = False,
    wait: bool = True,
) -> PipelineResult:
    """Run the pipeline on params.yaml; a failed gate stops the flow.

    Model stages whose key (data version, config, code, dependencies, upstream) has a cached
    result with unchanged files are reused; `force_from` runs that stage and all after it
    (training then starts over instead of resuming a checkpoint of the same run).
    Overrides of data settings make a one-off run: data outputs go to data/runs/<key>/ and the
    data version is recorded in a .dvc file there, never in dvc.lock (docs/decisions/0002); its
    model is registered but not promoted (`flywheel models promote` judges it on the pipeline's
    test split).
    Runs of one project run one at a time, whatever starts them (flows/limits.py): this one
    waits for another to finish, saying which, or with `wait=False` fails at once naming it.
    """
    overrides = overrides or {}
    one_off = changes_data(overrides)
    cfg = load_config(params_path, with_run_outputs(overrides), profile=profile)
    run_id = flow_run.get_id()
    actor = f"flow run {flow_run.get_name() or 'pipeline'} ({run_id or 'none'})"
    with run_lock(cfg.root, cfg.registry.model_name, actor, wait=wait):
        return run_stages(cfg, one_off, force_from, data_only, run_id, actor)


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


def run_stages(
    cfg: Config,
    one_off: bool,
    force_from: str | None,
    data_only: bool,
    run_id: str | None,
    actor: str,
) -> PipelineResult:
    """The stages of one pipeline run, collect through report (in the run lock)."""
    half = data_half(cfg, force_from, run_id, flow_runner(pipeline_run=not one_off))
    collected, data_plan, validation, prepared, version = (
        half.collected,
        half.plan,
        half.validation,
        half.prepared,
        half.version,
    )
    if data_only:
        result = PipelineResult(collected, validation, prepared, version, plan=data_plan)
        report_task(result)
        return result

    model_plan = plan_task(cfg, version.data_version, model_stages(not one_off), force_from, run_id)
    lineage = tracking.Lineage.of(cfg.root, version.data_version, run_id, collected.feedback_seq)
    with tracking.pipeline_run(
        cfg, lineage, flow_run.get_name() or "pipeline", prepared.split_paths
    ) as run:
        baseline = run_stage(model_plan, baseline_task, cfg, prepared, run)
        trained = run_stage(
            model_plan, train_task, cfg, prepared, run, resume=not model_plan.forced("train")
        )
        evaluation = run_stage(model_plan, evaluate_task, cfg, prepared, trained, baseline, run)
        exported = run_stage(model_plan, export_task, cfg, prepared, trained, run)
        registered = run_stage(model_plan, register_task, cfg, prepared, exported, run)
        decision = None
        if not one_off:  # a one-off data run's test split is not the champion's
            decision = run_stage(model_plan, promote_task, cfg, prepared, registered, run, actor)
        plan = data_plan.then(model_plan)  # what ran and what was reused
        tracking.set_tags(run, {f"flywheel.cache.{k}": v for k, v in plan.summary().items()})
    result = PipelineResult(
        collected,
        validation,
        prepared,
        version,
        baseline,
        trained,
        evaluation,
        exported,
        registered,
        decision,
        run,
        plan,
    )
    report_task(result)  # the run summary and per-class table on the flow-run page
    return result
