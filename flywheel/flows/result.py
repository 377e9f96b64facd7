"""What a pipeline run produced (`PipelineResult`) and its one summary, a line per stage: the
CLI prints it, the run's Prefect summary and a retrain's outcome start with it."""

from __future__ import annotations

from dataclasses import dataclass

from flywheel import tracking
from flywheel.cache import Plan
from flywheel.pii import counts_line
from flywheel.promotion import Decision
from flywheel.tasks.baseline import BaselineReport
from flywheel.tasks.collect import CollectResult
from flywheel.tasks.evaluate import EvaluateResult
from flywheel.tasks.export import ExportResult
from flywheel.tasks.prepare import PrepareResult
from flywheel.tasks.register import Registered
from flywheel.tasks.train import TrainResult
from flywheel.tasks.validate import ValidationReport
from flywheel.tasks.version import DataVersion


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


def export_line(export: ExportResult) -> str:
    """The export's choice, its parity and speed, or why it stayed fp32."""
    graph = "optimized" if export.graph.applied else "not optimized"
    latency = (
        f"p95 {export.latency.p95_ms:.1f} ms per text (fp32 {export.fp32_latency.p95_ms:.1f}, "
        f"graph {graph}: {export.graph.speedup:.2f}x)"
    )
    if export.test is None:
        why = export.reasons[-1] if export.reasons else "no int8 candidate"
        return f"fp32 ONNX (no int8 variant passed: {why}); {latency} -> {export.directory}"
    kept = len(next(c for c in export.candidates if c.name == export.chosen).keep_fp32)
    return (
        f"{export.chosen} ({kept} node groups kept fp32): test agreement "
        f"{export.test.agreement:.2%}, accuracy loss {100 * export.test.accuracy_loss:.2f} pts, "
        f"{export.speedup:.2f}x fp32 speed, {latency} -> {export.directory}"
    )


def pii_line(collected: dict[str, int], cleaned: dict[str, int]) -> str:
    """Personal data masked, by kind: in the raw table at collect, and what cleaning then
    revealed at prepare (0 unless markup hid it)."""
    kinds = dict.fromkeys([*cleaned, *collected])
    return counts_line({k: collected.get(k, 0) + cleaned.get(k, 0) for k in kinds})


def summary_lines(result: PipelineResult) -> dict[str, str]:
    """What a run did, one line per stage: what `flywheel run` prints, the head of the run's
    Prefect summary and of a retrain's outcome."""
    report = result.prepare.report
    per_source = ", ".join(f"{k}: {v:,}" for k, v in result.collect.rows_per_source.items())
    splits = ", ".join(f"{k} {v:,}" for k, v in result.prepare.rows_per_split.items())
    lines = {
        "collect": f"{result.collect.rows:,} rows ({per_source}) -> {result.collect.raw_path}",
        "validate": f"{result.validation.headline} -> {result.validation.report_dir}",
        "prepare": f"{report.rows_out:,} rows kept ({splits}); dropped {report.exact_duplicates} "
        f"exact + {report.normalised_duplicates} normalised duplicates, "
        f"{report.conflicting_label_rows} with conflicting labels, "
        f"{report.emptied_by_cleaning} empty after cleaning -> {result.prepare.prepared_dir}",
        "PII masked": pii_line(result.collect.pii_counts, report.pii_counts),
        "data version": f"{result.data_version} ({result.version.note})",
    }
    if result.collect.feedback is not None:  # quarantined rows are not in this data version
        screened = result.collect.feedback.line()
        lines = {"collect": lines.pop("collect"), "feedback": screened} | lines
    if result.evaluation is None:
        return lines | {"cache": cache_line(result.plan)}
    base, trained, ev = result.baseline, result.train, result.evaluation
    m, b = ev.report.metrics, ev.baseline.metrics
    resumed = (
        f", resumed at step {trained.resumed_from_step}"
        if trained.resumed_from_step is not None
        else ""
    )
    behaviour = ", ".join(
        f"{c.name} {c.cases - c.failures}/{c.cases}{'' if c.passed else ' FAILED'}"
        for c in ev.report.behaviour
    )
    lines |= {
        "baseline": f"TF-IDF + logistic regression (C={base.fit.chosen['C']:g}, "
        f"min_df={base.fit.chosen['min_df']:g}): test accuracy {b.accuracy:.4f}, "
        f"macro-F1 {b.macro_f1:.4f} ({base.fit.seconds:.0f} s)",
        "train": f"{trained.steps} steps on {trained.device} in {trained.seconds:.0f} s "
        f"({trained.samples_per_second:.1f} samples/s{resumed}); best val macro-F1 "
        f"{trained.best_val_macro_f1:.4f} at step {trained.best_step} -> {trained.model_dir}",
        "evaluate": f"test accuracy {m.accuracy:.4f} ({100 * ev.accuracy_gain:+.1f} pts vs "
        f"baseline), macro-F1 {m.macro_f1:.4f}, ECE {m.ece:.3f} -> {ev.report_dir}",
        "behaviour": behaviour,
        "export": export_line(result.export),
        "register": f"{result.registered.uri}: ONNX test accuracy "
        f"{result.registered.report.metrics.accuracy:.4f}, macro-F1 "
        f"{result.registered.report.metrics.macro_f1:.4f} -> {result.registered.report_dir}",
        "promote": result.promotion.summary()
        if result.promotion
        else "skipped: a one-off data run is registered, not promoted (see flywheel models "
        "promote)",
        "cache": cache_line(result.plan),
        "mlflow": tracking.run_url(result.mlflow_run),
    }
    return lines


def cache_line(plan: Plan) -> str:
    """Which model stages ran and which reused their cached result."""
    done = plan.summary()
    reused = [s for s, how in done.items() if how == "reused"]
    ran = [s for s, how in done.items() if how == "ran"]
    return f"reused: {', '.join(reused) or 'nothing'}; ran: {', '.join(ran) or 'nothing'}"
