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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flywheel import tracking
from flywheel.cache import DATA_STAGES, Plan, Stage
from flywheel.config import DEFAULT_PARAMS, Config, changes_data, load_config, with_run_outputs
from flywheel.flows.limits import run_lock
from flywheel.flows.plan import model_stages, plan_task
from flywheel.tasks.baseline import BaselineReport, baseline_task
from flywheel.tasks.collect import CollectResult, collect_task
from flywheel.tasks.evaluate import EvaluateResult, evaluate_task
from flywheel.tasks.export import ExportResult, export_task
from flywheel.tasks.prepare import PrepareResult, prepare_task
from flywheel.tasks.registry import Decision, Registered, promote_task, register_task
from flywheel.tasks.report import report_failure, report_task
from flywheel.tasks.train import TrainResult, train_task
from flywheel.tasks.validate import ValidationReport, validate_task
from flywheel.tasks.version import DataVersion, version_task


@dataclass(frozen=True)
class PipelineResult:
    """Everything a run produced, stage by stage; the model stages are None with data_only."""

    collect: CollectResult
    validation: ValidationReport
    prepare: PrepareResult
    version: DataVersion
    baseline: BaselineReport | None = None
    train: TrainResult | None = None
    evaluation: EvaluateResult | None = None
    export: ExportResult | None = None
    registered: Registered | None = None
    promotion: Decision | None = None
    mlflow_run: tracking.RunRef | None = None
    plan: Plan | None = None

    @property
    def data_version(self) -> str:
        return self.version.data_version


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
    force_from: Stage | None,
    data_only: bool,
    run_id: str | None,
    actor: str,
) -> PipelineResult:
    """The stages of one pipeline run, collect through report (in the run lock)."""
    collected = collect_task(cfg)
    data_plan = plan_task(cfg, collected.raw_md5, DATA_STAGES, force_from, run_id)
    validation = data_plan.run(validate_task, cfg, collected)
    prepared = data_plan.run(prepare_task, cfg, collected, validation)
    version = version_task(cfg, prepared, pipeline_run=not one_off)
    if data_only:
        result = PipelineResult(collected, validation, prepared, version, plan=data_plan)
        report_task(result)
        return result

    model_plan = plan_task(cfg, version.data_version, model_stages(not one_off), force_from, run_id)
    lineage = tracking.Lineage.of(cfg.root, version.data_version, run_id, collected.feedback_seq)
    with tracking.pipeline_run(
        cfg, lineage, flow_run.get_name() or "pipeline", prepared.split_paths
    ) as run:
        baseline = model_plan.run(baseline_task, cfg, prepared, run)
        trained = model_plan.run(
            train_task, cfg, prepared, run, resume=not model_plan.forced(Stage.TRAIN)
        )
        evaluation = model_plan.run(evaluate_task, cfg, prepared, trained, baseline, run)
        exported = model_plan.run(export_task, cfg, prepared, trained, run)
        registered = model_plan.run(register_task, cfg, prepared, exported, run)
        decision = None
        if not one_off:  # a one-off data run's test split is not the champion's
            decision = model_plan.run(promote_task, cfg, prepared, registered, run, actor)
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
