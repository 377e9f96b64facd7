"""The `flywheel` command line: run the pipeline, validate a file, run one stage for DVC, manage
the registered models and the feedback store, serve, look at runs (`ui`), schedule retraining,
measure performance (`bench`).
This module makes the app and registers the commands; each group lives in its own module."""

from __future__ import annotations

import typer

from flywheel.cli import bench, check, demo, feedback, models, run, schedule, serve, stages

app = typer.Typer(
    help="Flywheel: a Prefect-orchestrated MLOps pipeline for text classification.\n\n"
    "Start with `flywheel run` (the whole pipeline on params.yaml) or `flywheel validate FILE`.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",  # paragraphs re-wrapped to the terminal, `code` shown as code
    pretty_exceptions_enable=False,
)

# In the order `flywheel --help` lists them: commands, then groups.
app.command()(run.run)
app.command("validate")(check.validate_file)
app.command()(stages.stage)
app.command()(stages.stages)
app.command()(check.config)
app.command()(serve.ui)
app.command()(serve.serve)
app.command()(serve.monitor)
app.command()(run.retrain)
app.command()(bench.bench)
app.add_typer(schedule.schedule_app, name="schedule")
app.add_typer(models.models_app, name="models")
app.add_typer(demo.demo_app, name="demo")
app.add_typer(feedback.feedback_app, name="feedback")
