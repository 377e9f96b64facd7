"""The Flywheel pipeline as a Prefect flow: composition only, stage logic lives in tasks/.

    collect -> validate (GX gate) -> prepare (clean + split) -> version (DVC)
            -> baseline (TF-IDF) -> train (fine-tune) -> evaluate (test split, vs baseline)
            -> export (ONNX, int8 search on val, parity gate on test)
            -> register (MLflow model registry) -> promote (gates: champion or challenger)
            -> report (Prefect artifacts: run summary, per-class metrics)

The model stages run inside one MLflow parent run (see flywheel/tracking.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flywheel import tracking
from flywheel.config import DEFAULT_PARAMS, changes_data, load_config, with_run_outputs
from flywheel.tasks.baseline import BaselineReport, baseline_task
from flywheel.tasks.clean import PrepareResult, prepare_task
from flywheel.tasks.collect import CollectResult, collect_task
from flywheel.tasks.evaluate import EvaluateResult, evaluate_task
from flywheel.tasks.export import ExportResult, export_task
from flywheel.tasks.registry import Decision, Registered, promote_task, register_task
from flywheel.tasks.report import report_task
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

    @property
    def data_version(self) -> str:
        return self.version.data_version


@flow(name="flywheel-pipeline", log_prints=True, validate_parameters=True)
def pipeline(
    params_path: Path = DEFAULT_PARAMS,
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
    resume: bool = False,
    data_only: bool = False,
) -> PipelineResult:
    """Run the pipeline on params.yaml; a failed gate stops the flow.

    Overrides of data settings make a one-off run: data outputs go to data/runs/<key>/ and the
    data version is recorded in a .dvc file there, never in dvc.lock (docs/decisions/0002); its
    model is registered but not promoted (`flywheel models promote` judges it on the pipeline's
    test split).
    `resume` continues training from the last checkpoint of the same config and data.
    """
    overrides = overrides or {}
    cfg = load_config(params_path, with_run_outputs(overrides), profile=profile)
    collected = collect_task(cfg)
    validation = validate_task(cfg, collected)
    prepared = prepare_task(cfg, collected, validation)
    version = version_task(cfg, prepared, pipeline_run=not changes_data(overrides))
    if data_only:
        result = PipelineResult(collected, validation, prepared, version)
        report_task(result)
        return result

    lineage = tracking.Lineage.of(cfg.root, version.data_version, flow_run.get_id())
    with tracking.pipeline_run(
        cfg, lineage, flow_run.get_name() or "pipeline", prepared.split_paths
    ) as run:
        baseline = baseline_task(cfg, prepared, run)
        trained = train_task(cfg, prepared, run, resume=resume)
        evaluation = evaluate_task(cfg, prepared, trained, baseline, run)
        exported = export_task(cfg, prepared, trained, run)
        registered = register_task(cfg, prepared, exported, run)
        decision = None
        if not changes_data(overrides):  # a one-off data run's test split is not the champion's
            actor = f"flow run {flow_run.get_name() or 'pipeline'} ({flow_run.get_id() or 'none'})"
            decision = promote_task(cfg, prepared, registered, run, actor)
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
    )
    report_task(result)  # the run summary and per-class table on the flow-run page
    return result
