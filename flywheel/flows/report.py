"""Report: what a pipeline run did, as Prefect artifacts on its flow-run page: the run summary
(`flywheel-run-summary`), the per-class table (`flywheel-per-class`) and, when the flow fails,
`flywheel-run-failure` (`report_failure`, an on-failure hook).

The text is built by plain functions (tested without Prefect); the task only publishes it. What
each artifact holds: README.md (the stage table) and docs/operations.md (failures).
"""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flywheel.flows.result import PipelineResult, summary_lines
from flywheel.flows.stages import STAGES
from flywheel.promotion import Decision
from flywheel.tables import markdown_table
from flywheel.tasks.export import ExportResult

SUMMARY_KEY = "flywheel-run-summary"
PER_CLASS_KEY = "flywheel-per-class"
FAILURE_KEY = "flywheel-run-failure"
REGISTRY_STAGES = tuple(s.name for s in STAGES if s.facts)  # they change the registry


def summary_markdown(result: PipelineResult) -> str:
    """The run in one page of markdown: the summary's line per stage, then the test-split
    comparison, the promotion's evidence and the cache's decisions as tables."""
    lines = [
        f"# Flywheel run: data version `{result.data_version}`",
        "",
        markdown_table(["stage", "what it did"], list(summary_lines(result).items())),
    ]
    if result.evaluation is None:
        return "\n".join([*lines, "", "Data stages only (no model trained)."]) + "\n"
    scores = markdown_table(["model", "accuracy", "macro-F1"], _scores(result))
    lines += ["", "## Test split", scores]
    if result.export is not None:
        lines += ["", "## Export", *_export(result.export)]
    decision = result.promotion
    if decision is not None:
        lines += ["", "## Promotion", f"- {decision.summary()}", *_evidence(decision)]
    if result.plan is not None:
        rows = [
            [name, result.plan.summary().get(name, "-"), f"`{s.key.digest}`", s.reason]
            for name, s in result.plan.steps.items()
        ]
        lines += ["", "## Cache", markdown_table(["stage", "this run", "key", "why"], rows)]
    return "\n".join(lines) + "\n"


def _scores(result: PipelineResult) -> list[list[str]]:
    """Test accuracy and macro-F1 of the fine-tuned model, the baseline, the exported model and
    the champion it was judged against (re-scored on the same split)."""
    model, base = result.evaluation.report.metrics, result.evaluation.baseline.metrics
    rows = [
        ["fine-tuned (PyTorch)", f"{model.accuracy:.4f}", f"{model.macro_f1:.4f}"],
        ["TF-IDF baseline", f"{base.accuracy:.4f}", f"{base.macro_f1:.4f}"],
    ]
    if result.registered is not None:
        onnx = result.registered.report.metrics
        name = f"exported ONNX ({result.export.chosen}), version {result.registered.version}"
        rows.append([name, f"{onnx.accuracy:.4f}", f"{onnx.macro_f1:.4f}"])
    decision = result.promotion
    if decision is not None and decision.champion_scores:
        champion = decision.champion_scores
        rows.append(
            [
                f"champion before this run (version {decision.champion_before}, re-scored)",
                f"{champion['test_accuracy']:.4f}",
                f"{champion['test_macro_f1']:.4f}",
            ]
        )
    return rows


def _export(export: ExportResult) -> list[str]:
    """The export's parity and speed in more detail than its summary line."""
    parity = (
        f"agreement with fp32 {export.test.agreement:.2%}, accuracy loss "
        f"{100 * export.test.accuracy_loss:.2f} pts, macro-F1 loss "
        f"{100 * export.test.macro_f1_loss:.2f} pts"
        if export.test is not None
        else "no int8 variant passed: " + "; ".join(export.reasons[-3:])
    )
    return [
        f"- chosen: `{export.chosen}`; {parity}",
        f"- ONNX fp32 vs PyTorch: max |logit difference| {export.fp32_max_logit_diff:.1e}",
        f"- latency per text: p50 {export.latency.p50_ms:.1f} ms, p95 "
        f"{export.latency.p95_ms:.1f} ms (fp32 p95 {export.fp32_latency.p95_ms:.1f} ms)",
    ]


def _evidence(decision: Decision) -> list[str]:
    """The paired comparison behind a decision, then every gate with its figures."""
    lines = []
    if decision.paired is not None and decision.paired.estimates:
        pair = decision.paired
        lines.append(
            f"- candidate - champion on the same {pair.estimates[0].rows:,} test texts: "
            f"{pair.confidence:.0%} paired-bootstrap intervals ({pair.resamples:,} "
            f"resamples); {pair.discordant[0]} texts only the candidate gets right, "
            f"{pair.discordant[1]} only the champion (exact McNemar p = {pair.mcnemar_p:.3g})"
        )
    return lines + [f"  - {line}" for line in decision.gate_lines()]


def per_class_rows(result: PipelineResult) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support per label, for each model scored on test."""
    if result.evaluation is None:
        return []
    reports = {"fine-tuned": result.evaluation.report, "baseline": result.evaluation.baseline}
    if result.registered is not None:
        reports["onnx"] = result.registered.report
    return [
        {
            "model": name,
            "label": label,
            "precision": round(m.precision, 4),
            "recall": round(m.recall, 4),
            "f1": round(m.f1, 4),
            "support": m.support,
        }
        for name, report in reports.items()
        for label, m in report.metrics.per_class.items()
    ]


@task(name="report", cache_policy=NO_CACHE)
def report_task(result: PipelineResult) -> None:
    """Publish the run summary and the per-class table on the flow run's page."""
    create_markdown_artifact(
        summary_markdown(result), key=SUMMARY_KEY, description="What this pipeline run did"
    )
    rows = per_class_rows(result)
    if rows:
        create_table_artifact(rows, key=PER_CLASS_KEY, description="Per-class test metrics")


def failure_markdown(stages: list[tuple[str, str]], cause: str) -> str:
    """A failed run in a few lines: `stages` are (task, final state name) in the order they ran."""
    failed = [name for name, state in stages if state in ("Failed", "Crashed", "TimedOut")]
    where = f"`{failed[-1]}`" if failed else "the flow itself"
    done = [f"{name} ({state.lower()})" for name, state in stages if name not in failed]
    touched = [name for name, state in stages if name in REGISTRY_STAGES and name not in failed]
    registry = (
        "register/promote finished before the failure: see `flywheel models list`"
        if touched
        else "nothing was registered or promoted: the registry and the champion are untouched"
    )
    return (
        "\n".join(
            [
                f"# Flywheel run failed in {where}",
                "",
                f"**Cause:** {cause}",
                "",
                f"- finished before it: {', '.join(done) or 'nothing'}",
                f"- {registry}",
                "- to go on: fix the cause and run again; finished stages are reused from the "
                "cache and a training cut short resumes from its last checkpoint",
            ]
        )
        + "\n"
    )


def task_runs(flow_run_id: Any) -> list[Any]:
    """The task runs of one flow run, in the order they started; `stage_of` names their task."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(str(flow_run_id))])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
        )


def stage_of(task_run: Any) -> str:
    """The task a task run ran: its name is "<task>-<suffix>"."""
    return task_run.name.rsplit("-", 1)[0]


def report_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect on-failure hook: the failure summary as an artifact on the flow run and a log."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    stages = [(stage_of(r), r.state.name if r.state else "?") for r in task_runs(flow_run.id)]
    markdown = failure_markdown(stages, state.message or "unknown")
    with get_client(sync_client=True) as client:
        client.create_artifact(
            ArtifactCreate(
                key=FAILURE_KEY,
                type="markdown",
                data=markdown,
                description="Why this pipeline run failed",
                flow_run_id=flow_run.id,
            )
        )
    logging.getLogger(__name__).error("run failed:\n%s", markdown)
