"""The CLI's view of the stages, read from their declarations (`STAGE` in each tasks/ module,
in order in flows/stages.py): `flywheel stages`, `flywheel stage NAME` (what dvc.yaml calls) and
the stage `flywheel run --force/--force-from` starts from."""

from __future__ import annotations

from typing import Annotated

import typer

from flywheel.cli.common import ParamsOption, user_errors
from flywheel.config import DEFAULT_PARAMS, ConfigError, load_config
from flywheel.tables import text_table

ForceOption = Annotated[
    bool,
    typer.Option("--force", help="Run every stage, reusing nothing from the cache."),
]
ForceFromOption = Annotated[
    str | None,
    typer.Option(
        "--force-from",
        metavar="STAGE",
        help="Run this cached stage and every one after it (`flywheel stages` lists them); "
        "earlier ones may still be reused.",
    ),
]


def forced_stage(force: bool, force_from: str | None) -> str | None:
    """The stage a run starts anew from: the first for --force, --force-from's (checked), or
    None (reuse what the cache allows)."""
    if force and force_from:
        raise ConfigError("--force runs every model stage; use it or --force-from, not both")
    if not (force or force_from):
        return None
    from flywheel.flows.stages import CACHED, parse_stage

    return CACHED[0].name if force else parse_stage(str(force_from))


def stages() -> None:
    """The pipeline's stages in order, as each declares itself: what its cache key is built on,
    the config it reads, the stages whose results it consumes."""
    from flywheel.flows.stages import STAGES

    rows = [
        {
            "stage": s.name,
            "keyed on": {"raw": "raw table", "data": "data version"}.get(s.keyed_on or "", "-"),
            "dvc": "yes" if s.standalone else "",
            "upstream": ", ".join(s.upstream) or "-",
            "reads": ", ".join(s.reads) or "-",
        }
        for s in STAGES
    ]
    typer.echo(text_table(rows))
    typer.echo("\nkeyed on -: always runs. dvc: a dvc.yaml stage (`flywheel stage NAME`).")


def stage(
    name: Annotated[str, typer.Argument(help="A dvc.yaml stage (`flywheel stages`: dvc yes).")],
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Run one stage on params.yaml without Prefect (what dvc.yaml calls).

    It holds the project's run lock like `flywheel run`, so `dvc repro` never changes data/
    under a running pipeline (it waits for it)."""
    from flywheel.flows.limits import run_lock
    from flywheel.flows.stages import DVC_STAGES, parse_stage, run_standalone

    with user_errors(params):
        name = parse_stage(name, DVC_STAGES, "flywheel stage")
        cfg = load_config(params)
        lock = run_lock(cfg.root, cfg.registry.model_name, f"flywheel stage {name}")
    with user_errors(params), lock:
        typer.echo(run_standalone(name, cfg))
