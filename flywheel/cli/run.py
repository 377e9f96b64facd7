"""`flywheel run` and `flywheel retrain`: the pipeline flow and the retrain check, and the one-line-
per-stage report both print of what a run did."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from flywheel.cli.common import (
    LabelColOption,
    LabelsOption,
    ParamsOption,
    ProfileOption,
    SetOption,
    SourceOption,
    TextColOption,
    collect_overrides,
    user_errors,
)
from flywheel.cli.stages import ForceFromOption, ForceOption, forced_stage
from flywheel.config import DEFAULT_PARAMS, Config, load_config
from flywheel.tables import text_table

DryRunOption = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Print, per stage, whether it would run or reuse its cached result and why; "
        "writes nothing to the project.",
    ),
]
DataOnlyOption = Annotated[
    bool,
    typer.Option("--data-only", help="Stop after the data stages (no training)."),
]
NoWaitOption = Annotated[
    bool,
    typer.Option(
        "--no-wait",
        help="If another run of this project is running, stop at once with an error naming "
        "it (exit code 2) instead of waiting for it to finish.",
    ),
]


def run(
    params: ParamsOption = DEFAULT_PARAMS,
    source: SourceOption = None,
    text_col: TextColOption = None,
    label_col: LabelColOption = None,
    labels: LabelsOption = None,
    sets: SetOption = None,
    profile: ProfileOption = None,
    force: ForceOption = False,
    force_from: ForceFromOption = None,
    dry_run: DryRunOption = False,
    data_only: DataOnlyOption = False,
    no_wait: NoWaitOption = False,
) -> None:
    """Run the pipeline as a Prefect flow: collect -> validate -> prepare -> version (DVC) ->
    baseline -> train -> evaluate -> export (ONNX, int8) -> register -> promote, tracked in
    MLflow.

    With no options it runs on params.yaml (by default the embedded Rotten Tomatoes snippets):
    writes data/raw, data/validation and data/prepared, records the data version in dvc.lock,
    pushes the prepared data to the DVC remote, fits the TF-IDF baseline, fine-tunes the
    transformer (checkpoints/), evaluates both on the test split (reports/evaluation/), exports
    the model to ONNX (int8 where it keeps parity), registers it in the MLflow model registry and
    promotes it to `champion` if it passes the gates of params.yaml's `registry` section. Every
    run is one MLflow parent run with a nested run per model stage (mlflow/).

    Stages are cached (all but collect, version and report): a stage whose inputs (the content
    hash of its input data, the config keys it reads, its code, the installed ML stack, the
    stages before it) are unchanged reuses its persisted result, so a re-run with nothing
    changed takes seconds; see --dry-run. A run killed during training resumes from its last
    checkpoint when started again.

    Options that change the data (--source, --set on data keys) make a one-off run: data goes
    under `data/runs/<key>/` and its version into a .dvc file there. --set train.* / evaluate.*
    and --profile keep the data of params.yaml.

    Runs of one project, whatever starts them (this command, a schedule, a retrain), run one at
    a time, data stages through promotion: a second one waits, saying which run it waits for
    (see --no-wait).
    """
    with user_errors(params):
        overrides = collect_overrides(sets, source, text_col, label_col, labels)
        cfg = load_config(params, overrides, profile=profile)  # fail fast, before Prefect starts
        stage = forced_stage(force, force_from)
        if dry_run:
            from flywheel.flows.data import dry_run

            data_version, plan = dry_run(params.resolve(), overrides, profile, stage, data_only)
            typer.echo("collect and version always run; the data version would be " + data_version)
            typer.echo(plan.table())
            return
        result = run_pipeline(params, cfg, overrides, profile, stage, data_only, no_wait)
    echo_summary(result)


def run_pipeline(
    params: Path,
    cfg: Config,
    overrides: dict[str, Any],
    profile: str | None,
    stage: str | None,
    data_only: bool,
    no_wait: bool,
) -> Any:
    """The pipeline flow on a loaded config; its PipelineResult."""
    from flywheel import runtime
    from flywheel.flows.limits import run_lock_path, runs_of
    from flywheel.locks import ensure_free

    if no_wait:  # fail fast, before Prefect starts; the flow checks again as it takes it
        ensure_free(run_lock_path(cfg.root), runs_of(cfg.root))
    with on_prefect_server(cfg.root) as prefect_ready:
        if not data_only:
            runtime.select_device(cfg.train.device, cfg.train.precision)
        from flywheel.flows.pipeline import pipeline

        prefect_ready()
        return pipeline(
            params_path=params.resolve(),
            overrides=overrides or None,
            profile=profile,
            force_from=stage,
            data_only=data_only,
            wait=not no_wait,
        )


@contextmanager
def on_prefect_server(root: Path) -> Iterator[Callable[[], object]]:
    """The Prefect server for the flow runs inside (servers.prefect_api): PREFECT_API_URL, else
    the running `flywheel ui` (said on the terminal: the run shows live there), else one started
    now and stopped afterwards. Yields `ready()`, to call before the flow: a server started now
    starts while the caller imports torch, transformers and MLflow, not after."""
    import logging

    from flywheel import servers

    with servers.prefect_api(root, logging.getLogger(__name__).info, wait=False) as api:
        if api.source == "flywheel ui":
            typer.echo(f"flywheel ui is running: this run goes to its Prefect server ({api.url})")
        yield api.ready


def retrain(
    params: ParamsOption = DEFAULT_PARAMS,
    if_needed: Annotated[
        bool,
        typer.Option(
            "--if-needed",
            help="Retrain only if feedback or drift crosses a bound of params.yaml `retrain:` "
            "(and not within the cool-down); without it the pipeline runs in any case.",
        ),
    ] = False,
) -> None:
    """Check the evidence against the champion and retrain on the data plus the feedback.

    The check, since the champion's training data: new feedback rows (retrain.min_feedback),
    the champion's accuracy on them (retrain.min_feedback_accuracy), and drift of the served
    traffic in the prediction log against the champion's reference profile (retrain.max_psi,
    max_label_shift, max_oov_drift). A retrain is `flywheel run` (the feedback store is one of
    its sources: a new data version with source=feedback rows, PII-masked), and the usual gates
    decide whether the new model becomes champion. Fired on drift alone with no new labelled
    rows, it is an alert and trains nothing (outcome "no new data"). The decision, fired or not
    and why, is a Prefect artifact (flywheel-retrain-decision); the outcome (promoted, not
    promoted, already champion, no new data, failed) is recorded for the next check. For an
    hourly check: `flywheel schedule serve --flow retrain`.
    """
    from flywheel import runtime

    with user_errors(params):
        cfg = load_config(params)
        with on_prefect_server(cfg.root) as prefect_ready:
            runtime.select_device(cfg.train.device, cfg.train.precision)
            from flywheel.flows.retrain import retrain as retrain_flow

            prefect_ready()
            result = retrain_flow(params_path=params.resolve(), if_needed=if_needed)
    typer.echo(text_table([check_row(c) for c in result.decision.checks]))
    typer.echo(result.decision.headline())
    if result.pipeline is not None:
        echo_summary(result.pipeline)
    if result.outcome is not None:
        typer.echo(f"     outcome  {result.outcome}")


def check_row(check: Any) -> dict[str, str]:
    """One retrain-check criterion as a table row."""
    return {
        "check": check.name,
        "value": check.value,
        "fires when": check.bound,
        "state": "CROSSED" if check.crossed else "holds",
        "note": check.note or "-",
    }


def echo_summary(result: Any) -> None:
    """Print what a pipeline run did, one line per stage."""
    from flywheel.flows.result import summary_lines

    for name, text in summary_lines(result).items():
        typer.echo(f"{name:>12}  {text}")
