"""Commands that look before anything runs: `flywheel validate FILE` (the pipeline's data gate on
one file) and `flywheel config` (the resolved configuration)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml

from flywheel.cli.common import (
    LabelsOption,
    ParamsOption,
    ProfileOption,
    SetOption,
    collect_overrides,
    user_errors,
)
from flywheel.config import DEFAULT_PARAMS, load_config


def validate_file(
    path: Annotated[Path, typer.Argument(help="CSV/TSV/JSONL/Parquet file or folder to check.")],
    params: ParamsOption = DEFAULT_PARAMS,
    text_col: Annotated[str, typer.Option("--text-col", help="Text column.")] = "text",
    label_col: Annotated[str, typer.Option("--label-col", help="Label column.")] = "label",
    labels: LabelsOption = None,
    report_dir: Annotated[
        Path | None,
        typer.Option(
            "--report-dir", help="Where to write the result (default: `reports/validate-<name>`)."
        ),
    ] = None,
    sets: SetOption = None,
) -> None:
    """Check a file with the pipeline's Great Expectations suite: exit 0 if valid, 1 if not.

    Bounds (lengths, duplicate rate, class balance) come from params.yaml's `validate` section;
    the label set is inferred from the file unless --labels is given.
    """
    from flywheel.config import PathSource
    from flywheel.sources import read_path_source
    from flywheel.tasks.validate import run_suite

    with user_errors(params):
        overrides = collect_overrides(sets, labels=labels)
        overrides.setdefault("validate.labels", None)
        cfg = load_config(params, overrides)
        frame = read_path_source(
            PathSource(kind="path", path=path.resolve(), text_col=text_col, label_col=label_col),
            cfg.root,
        )
        target = report_dir or cfg.root / "reports" / f"validate-{path.stem}"
        report = run_suite(frame, cfg.validate_, target.resolve())
    typer.echo(report.summary(), err=not report.success)
    raise typer.Exit(0 if report.success else 1)


def config(
    params: ParamsOption = DEFAULT_PARAMS,
    sets: SetOption = None,
    profile: ProfileOption = None,
) -> None:
    """Print the resolved configuration (params.yaml with defaults, profile and --set)."""
    with user_errors(params):
        cfg = load_config(params, collect_overrides(sets), profile=profile)
    yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sys.stdout, sort_keys=False)
