"""The Flywheel pipeline as a Prefect flow: composition only, stage logic lives in tasks/.

    collect -> validate (GX gate) -> prepare (clean + split) -> version (DVC)

Later stages (train, evaluate, export, register, promote) are added here in the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow

from flywheel.config import DEFAULT_PARAMS, load_config, with_run_outputs
from flywheel.tasks.clean import PrepareResult, prepare_task
from flywheel.tasks.collect import CollectResult, collect_task
from flywheel.tasks.validate import ValidationReport, validate_task
from flywheel.tasks.version import DataVersion, version_task


@dataclass(frozen=True)
class PipelineResult:
    """Everything a run produced, stage by stage; `data_version` tags later runs."""

    collect: CollectResult
    validation: ValidationReport
    prepare: PrepareResult
    version: DataVersion

    @property
    def data_version(self) -> str:
        return self.version.data_version


@flow(name="flywheel-pipeline", log_prints=True, validate_parameters=True)
def pipeline(
    params_path: Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None
) -> PipelineResult:
    """Run the data stages on params.yaml; a failed gate stops the flow.

    With overrides it is a one-off run: outputs go to data/runs/<key>/ and the data version is
    recorded in a .dvc file there, never in dvc.lock (see docs/decisions/0002).
    """
    cfg = load_config(params_path, with_run_outputs(overrides or {}))
    collected = collect_task(cfg)
    validation = validate_task(cfg, collected)
    prepared = prepare_task(cfg, collected, validation)
    version = version_task(cfg, prepared, pipeline_run=not overrides)
    return PipelineResult(collected, validation, prepared, version)
