"""The Flywheel pipeline as a Prefect flow: composition only, stage logic lives in tasks/.

`pipeline` holds the project's run lock (flows/limits.py) around the data half (flows/data.py),
the model stages in one MLflow parent run (flywheel/tracking.py), each through the stage cache
(`run_stage`), and the report. Stage order: docs/architecture.md. Why: docs/decisions/0007 (the
cache), 0011 (the run lock), 0004 (the MLflow run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flywheel import tracking
from flywheel.config import DEFAULT_PARAMS, Config, changes_data, load_config, with_run_outputs
from flywheel.flows.data import data_half, flow_runner
from flywheel.flows.limits import run_lock
from flywheel.flows.plan import model_stages, plan_task
from flywheel.flows.report import report_failure, report_task
from flywheel.flows.result import PipelineResult
from flywheel.flows.stages import Stage, run_stage
from flywheel.tasks.baseline import baseline_task
from flywheel.tasks.evaluate import evaluate_task
from flywheel.tasks.export import export_task
from flywheel.tasks.promote import promote_task
from flywheel.tasks.register import register_task
from flywheel.tasks.train import train_task


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
    collected, data_plan, version = half.collected, half.plan, half.version
    validation, prepared = half.validation, half.prepared
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
