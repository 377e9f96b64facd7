"""The register stage: the exported model scored on the test split through the ONNX predictor,
then registered as a new version with its lineage (data version, git commit, flow run), test
metrics, parity and latency as tags. The registry client is flywheel/registry.py, the packaging
flywheel/models/mlflow_model.py (why: docs/decisions/0006).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import tracking
from flywheel.config import Config
from flywheel.io import read_parquet
from flywheel.models.predictor import MODEL_FILE, OnnxPredictor
from flywheel.registry import ModelRegistry
from flywheel.stages import StageSpec
from flywheel.tasks.evaluate import EvaluationReport, evaluate_model

if TYPE_CHECKING:
    from flywheel.tasks.export import ExportResult
    from flywheel.tasks.prepare import PrepareResult

STAGE = StageSpec(
    name="register",
    module=__name__,
    reads=("evaluate", "registry.model_name"),
    upstream=("export",),
    facts="cache_facts",
    ships=("flywheel.models.mlflow_model",),  # the pyfunc wrapper, packaged by path
)


@dataclass(frozen=True)
class Registered:
    """A registered version and the scores it was registered with."""

    name: str
    version: str
    report: EvaluationReport  # the ONNX model on the test split
    report_dir: Path
    p95_ms: float
    run_id: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def cache_facts(self) -> dict[str, str]:
        """The version this registration made: deleted or replaced since, the stage runs again."""
        return {"model": self.name, "version": self.version, "run_id": self.run_id}


def version_tags(
    lineage: tracking.Lineage, exported: ExportResult, report: EvaluationReport, pipeline_run: str
) -> dict[str, str]:
    """What a version is made of and how good it is, as registry tags."""
    m = report.metrics
    tags = {
        "flywheel.data_version": lineage.data_version,
        "flywheel.git_commit": lineage.git_commit,
        "flywheel.git_dirty": str(lineage.git_dirty).lower(),
        "flywheel.flow_run_id": lineage.flow_run_id or "none",
        tracking.FEEDBACK_SEQ_TAG: str(lineage.feedback_seq),
        "flywheel.mlflow_run_id": pipeline_run,
        "flywheel.variant": exported.chosen,
        "flywheel.size_mb": f"{(exported.directory / MODEL_FILE).stat().st_size / 1e6:.1f}",
        "flywheel.test.rows": str(m.rows),
        "flywheel.test.accuracy": f"{m.accuracy:.6f}",
        "flywheel.test.macro_f1": f"{m.macro_f1:.6f}",
        "flywheel.test.weighted_f1": f"{m.weighted_f1:.6f}",
        "flywheel.test.ece": f"{m.ece:.6f}",
        "flywheel.parity.passed": str(exported.parity_passed).lower(),
        "flywheel.parity.fp32_max_logit_diff": f"{exported.fp32_max_logit_diff:.3e}",
        "flywheel.latency.p50_ms": f"{exported.latency.p50_ms:.2f}",
        "flywheel.latency.p95_ms": f"{exported.latency.p95_ms:.2f}",
    }
    if m.roc_auc is not None:
        tags["flywheel.test.roc_auc"] = f"{m.roc_auc:.6f}"
    if exported.test is not None:
        tags |= {
            "flywheel.parity.test_agreement": f"{exported.test.agreement:.6f}",
            "flywheel.parity.test_accuracy_loss": f"{exported.test.accuracy_loss:.6f}",
            "flywheel.parity.test_macro_f1_loss": f"{exported.test.macro_f1_loss:.6f}",
        }
    return tags


@task(name="register", cache_policy=NO_CACHE)
def register_task(
    cfg: Config, prepared: PrepareResult, exported: ExportResult, parent: tracking.RunRef
) -> Registered:
    """Score the exported model on test through the ONNX predictor, then register it."""
    test = read_parquet(prepared.split_paths["test"])
    registry = ModelRegistry(parent.uri, cfg.registry.model_name)
    with tracking.stage_run(cfg, "register", parent) as run:
        report, folder = evaluate_model(cfg, OnnxPredictor(exported.directory), test, "onnx")
        tracking.log_scalars(run, report.scalars())
        tracking.log_artifacts(run, folder)
        info = registry.register(
            exported.directory,
            run,
            version_tags(parent.lineage, exported, report, parent.run_id),
            f"{exported.chosen} ONNX model, data version {parent.lineage.data_version}",
        )
        tracking.set_tags(
            run, {"flywheel.model_name": registry.name, "flywheel.model_version": info.version}
        )
    return Registered(
        registry.name,
        info.version,
        report,
        folder,
        exported.latency.p95_ms,
        run.run_id,
    )
