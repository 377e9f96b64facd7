"""What every command group shares: the option types (--params, --set, --source, ...), the
overrides they make, and `user_errors`, which turns known failures into a message and an exit
code. Imports nothing heavy: `flywheel --help` loads it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from flywheel.config import ConfigError, parse_override

ParamsOption = Annotated[
    Path, typer.Option("--params", "-p", help="Config file; its folder is the project root.")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override one config value, e.g. --set split.train=0.7 (repeatable).",
    ),
]
SourceOption = Annotated[
    Path | None,
    typer.Option(
        "--source",
        help="Use this CSV/TSV/JSONL/Parquet file or folder instead of the "
        "configured sources (labels are then inferred unless --labels is given).",
    ),
]
TextColOption = Annotated[str | None, typer.Option("--text-col", help="Text column of --source.")]
LabelColOption = Annotated[
    str | None, typer.Option("--label-col", help="Label column of --source.")
]
LabelsOption = Annotated[
    str | None, typer.Option("--labels", help="Allowed labels, comma-separated, e.g. pos,neg.")
]
ProfileOption = Annotated[
    str | None,
    typer.Option("--profile", help="Apply a named profile from params.yaml, e.g. gpu."),
]


@contextmanager
def user_errors(params: Path) -> Iterator[None]:
    """Set up the process for the project at `params`; turn known failures into a message and an
    exit code (1: the data failed validation, 2: bad input or config), not a traceback."""
    from flywheel import runtime
    from flywheel.errors import FlywheelError

    runtime.configure(params.resolve().parent)
    from flywheel.tasks.validate import DataValidationError

    try:
        yield
    except DataValidationError as exc:
        typer.echo(exc.report.summary(), err=True)
        raise typer.Exit(1) from None
    except (FlywheelError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def collect_overrides(
    sets: list[str] | None,
    source: Path | None = None,
    text_col: str | None = None,
    label_col: str | None = None,
    labels: str | None = None,
) -> dict[str, Any]:
    """CLI options as dotted config overrides (validated by the same loader as params.yaml).

    --source replaces every configured source, feedback included, and drops the configured
    label set and positive/negative labels (they describe the configured data, not this file);
    explicit --set and --labels values still win over those defaults.
    """
    if source is None and (text_col or label_col):
        raise ConfigError("--text-col/--label-col need --source")
    overrides: dict[str, Any] = {}
    if source is not None:
        overrides["data.sources"] = [
            {
                "kind": "path",
                "path": str(source.resolve()),
                "text_col": text_col or "text",
                "label_col": label_col or "label",
            }
        ]
        overrides["data.feedback.enabled"] = False
        overrides["validate.labels"] = None
        overrides["evaluate.positive_label"] = None
        overrides["evaluate.negative_label"] = None
    overrides.update(parse_override(item) for item in sets or [])
    if labels is not None:
        overrides["validate.labels"] = [x.strip() for x in labels.split(",") if x.strip()]
    return overrides
