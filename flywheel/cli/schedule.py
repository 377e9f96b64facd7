"""`flywheel schedule add | serve | list | remove`: scheduled retraining as Prefect deployments
with a cron schedule, deployed to a work pool (`add`) or served by this process (`serve`).
The flag form of earlier releases (`flywheel schedule --cron/--list/--remove`) still works for
one release, with a note on stderr naming the subcommand."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flywheel.cli.common import ParamsOption, user_errors
from flywheel.config import DEFAULT_PARAMS, ConfigError, load_config
from flywheel.tables import text_table

if TYPE_CHECKING:
    from flywheel.flows.schedule import CronSpec, Schedulable


class ScheduledFlow(StrEnum):
    pipeline = "pipeline"
    retrain = "retrain"


CronOption = Annotated[
    str | None,
    typer.Option(
        "--cron",
        metavar="EXPR",
        help='Retrain on this cron schedule, e.g. "0 3 * * 1" (Mondays at 03:00); '
        "for --flow retrain it defaults to retrain.cron (hourly).",
    ),
]
FlowOption = Annotated[
    ScheduledFlow,
    typer.Option(
        "--flow",
        help="pipeline: retrain on every run; retrain: check feedback and drift each run and "
        "retrain only when a bound is crossed (`flywheel retrain --if-needed`).",
    ),
]
NameOption = Annotated[
    str | None,
    typer.Option(
        "--name",
        help="Deployment name; the same name updates its schedule (default: retrain for "
        "the pipeline, if-needed for the retrain check).",
    ),
]
TimezoneOption = Annotated[str, typer.Option("--timezone", help="Time zone of --cron (IANA name).")]
WorkPoolOption = Annotated[
    str,
    typer.Option(
        "--work-pool",
        metavar="POOL",
        help="The work pool (a process pool is created if missing); runs start when a worker "
        "polls it: prefect worker start --pool POOL.",
    ),
]

schedule_app = typer.Typer(no_args_is_help=True)


@schedule_app.callback(invoke_without_command=True)
def schedule(
    ctx: typer.Context,
    params: Annotated[Path, typer.Option("--params", "-p", hidden=True)] = DEFAULT_PARAMS,
    cron: Annotated[str | None, typer.Option("--cron", hidden=True)] = None,
    flow: Annotated[ScheduledFlow, typer.Option("--flow", hidden=True)] = ScheduledFlow.pipeline,
    name: Annotated[str | None, typer.Option("--name", hidden=True)] = None,
    timezone: Annotated[str, typer.Option("--timezone", hidden=True)] = "UTC",
    work_pool: Annotated[str | None, typer.Option("--work-pool", hidden=True)] = None,
    list_: Annotated[bool, typer.Option("--list", hidden=True)] = False,
    remove: Annotated[str | None, typer.Option("--remove", hidden=True)] = None,
) -> None:
    """Scheduled retraining: a Prefect deployment with a cron schedule.

    `add` deploys it to a work pool, where `prefect worker start --pool POOL` runs it; `serve`
    serves it from this process until Ctrl-C (Prefect then pauses the schedule until it is
    served again); `list` and `remove` manage the deployments. With --flow pipeline each
    scheduled run is `flywheel run` on --params; with --flow retrain it is `flywheel retrain
    --if-needed` (--cron defaults to retrain.cron, hourly).

    The Prefect server used: PREFECT_API_URL if set, else the running `flywheel ui`, else one
    started for this command (on the project's Prefect database, so deployments stay and show
    in `flywheel ui`).

    The flag form of earlier releases (`flywheel schedule --cron EXPR [--work-pool POOL]`,
    `--list`, `--remove NAME`) still works in this release, with a note naming the subcommand;
    the next release drops it.
    """
    if ctx.invoked_subcommand is None:
        flag_form(params, cron, flow, name, timezone, work_pool, list_, remove)
        return
    flags = {
        "--params": params != DEFAULT_PARAMS,
        "--cron": cron is not None,
        "--flow": flow is not ScheduledFlow.pipeline,
        "--name": name is not None,
        "--timezone": timezone != "UTC",
        "--work-pool": work_pool is not None,
        "--list": list_,
        "--remove": remove is not None,
    }
    if given := [flag for flag, set_ in flags.items() if set_]:
        with user_errors(params):
            raise ConfigError(
                f"options go after the subcommand: flywheel schedule {ctx.invoked_subcommand} "
                f"[OPTIONS] (got {', '.join(given)} before it)"
            )


def flag_form(
    params: Path,
    cron: str | None,
    flow: ScheduledFlow,
    name: str | None,
    timezone: str,
    work_pool: str | None,
    list_: bool,
    remove: str | None,
) -> None:
    """The deprecated flag form: its checks and messages as before, a note naming the subcommand
    it maps to, then that subcommand's work."""
    with user_errors(params):
        if flow is ScheduledFlow.retrain and not (cron or list_ or remove):
            cron = load_config(params).retrain.cron
        if sum(bool(action) for action in (cron, list_, remove)) != 1:
            raise ConfigError(
                "give one of --cron EXPR, --list or --remove NAME (a deprecated form: see "
                "`flywheel schedule --help` for add, serve, list and remove)"
            )
        if work_pool and not cron:
            raise ConfigError("--work-pool goes with --cron")
        new = "list" if list_ else "remove NAME" if remove else "add" if work_pool else "serve"
        typer.echo(
            "note: the flag form of `flywheel schedule` is deprecated and goes in the next "
            f"release: use `flywheel schedule {new}`"
            + (" with the same options" if new in ("add", "serve") else ""),
            err=True,
        )
        if list_:
            list_schedules(params)
        elif remove:
            remove_schedule(params, remove)
        else:
            target, spec = deployment_target(params, flow, cron, timezone)
            if work_pool:
                add_schedule(params, target, name, spec, work_pool)
            else:
                serve_schedule(params, target, name, spec)


@schedule_app.command("add")
def schedule_add(
    params: ParamsOption = DEFAULT_PARAMS,
    cron: CronOption = None,
    flow: FlowOption = ScheduledFlow.pipeline,
    name: NameOption = None,
    timezone: TimezoneOption = "UTC",
    *,
    work_pool: WorkPoolOption,
) -> None:
    """Deploy the schedule to a work pool and return: runs start when a worker polls the pool.

    Creates the deployment, or updates the schedule of the one of that name. The worker runs
    each flow run in the project folder with the CLI's offline settings. Workers need a Prefect
    server that stays up (PREFECT_API_URL or `flywheel ui`)."""
    with user_errors(params):
        target, spec = deployment_target(params, flow, cron, timezone)
        add_schedule(params, target, name, spec, work_pool)


@schedule_app.command("serve")
def schedule_serve(
    params: ParamsOption = DEFAULT_PARAMS,
    cron: CronOption = None,
    flow: FlowOption = ScheduledFlow.pipeline,
    name: NameOption = None,
    timezone: TimezoneOption = "UTC",
) -> None:
    """Create or update the deployment and serve it from this process until Ctrl-C.

    Its runs start in subprocesses of this process. When it stops, Prefect pauses the schedule
    until it is served again, so no runs pile up while nothing serves it."""
    with user_errors(params):
        target, spec = deployment_target(params, flow, cron, timezone)
        serve_schedule(params, target, name, spec)


@schedule_app.command("list")
def schedule_list(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """The pipeline's deployments: flow, name, schedule, active or paused, where they run (served
    or a work pool, and whether something polls them), next and last run."""
    with user_errors(params):
        list_schedules(params)


@schedule_app.command("remove")
def schedule_remove(
    name: Annotated[
        str, typer.Argument(help="The deployment: NAME, or FLOW/NAME when two flows share it.")
    ],
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Delete a deployment and its scheduled runs."""
    with user_errors(params):
        remove_schedule(params, name)


def deployment_target(
    params: Path, flow: ScheduledFlow, cron: str | None, timezone: str
) -> tuple[Schedulable, CronSpec]:
    """The flow to schedule and its checked cron schedule (for the retrain check, retrain.cron
    unless given); fails before any Prefect server is looked for."""
    from flywheel.flows import schedule as deployments

    if cron is None and flow is ScheduledFlow.retrain:
        cron = load_config(params).retrain.cron
    if not cron:
        raise ConfigError('give --cron EXPR, e.g. --cron "0 3 * * 1" (Mondays at 03:00)')
    spec = deployments.parse_cron(cron, timezone)
    load_config(params)  # the runs will need it: fail now, not at 03:00
    return deployments.FLOWS[flow.value], spec


@contextmanager
def prefect_server(params: Path) -> Iterator[tuple[Any, str]]:
    """The Prefect API of the project at `params` for the block, and where it is, in words."""
    from flywheel import servers

    root = params.resolve().parent
    with servers.prefect_api(root, lambda text: typer.echo(text, err=True)) as api:
        yield api, f"on {api.url.removesuffix('/api')} ({api.source})"


def add_schedule(
    params: Path, target: Schedulable, name: str | None, spec: CronSpec, work_pool: str
) -> None:
    """Deploy to `work_pool` and say how to start a worker for it."""
    from flywheel.flows import schedule as deployments

    name = name or target.default_deployment
    with prefect_server(params) as (api, where):
        created = deployments.deploy_to_pool(params, name, spec, work_pool, target)
        made = f" (created process work pool {work_pool!r})" if created else ""
        typer.echo(
            f"deployed {target.flow_name}/{name} to work pool {work_pool!r}{made} "
            f"{where}: {spec}, next run {deployments.stamp(spec.next_run)}"
        )
        prefect = Path(sys.executable).parent / "prefect"
        typer.echo(
            f"start a worker to run it: PREFECT_API_URL={api.url} {prefect} worker start "
            f"--pool {work_pool}"
        )
        if api.source == "started for this command":
            typer.echo(
                "(this server stops with this command: workers need one that stays up, "
                "e.g. `flywheel ui`, on the same database)"
            )


def serve_schedule(params: Path, target: Schedulable, name: str | None, spec: CronSpec) -> None:
    """Serve the deployment from this process until Ctrl-C."""
    from flywheel.flows import schedule as deployments

    name = name or target.default_deployment
    with prefect_server(params) as (_, where):
        typer.echo(
            f"serving {target.flow_name}/{name} {where}: {spec}, next run "
            f"{deployments.stamp(spec.next_run)}; Ctrl-C stops serving (the schedule "
            "is paused until served again)"
        )
        deployments.serve(params, name, spec, target)
        typer.echo(f"stopped serving {target.flow_name}/{name}; schedule paused")


def list_schedules(params: Path) -> None:
    """Print the deployments of Flywheel's flows as a table."""
    from flywheel.flows import schedule as deployments

    with prefect_server(params) as (_, where):
        found = deployments.deployments()
        if not found:
            typer.echo(f"no Flywheel deployments {where}")
            return
        typer.echo(f"Flywheel deployments {where}")
        typer.echo(text_table([schedule_row(item) for item in found]))


def remove_schedule(params: Path, name: str) -> None:
    """Delete the deployment `name` ("NAME" or "FLOW/NAME")."""
    from flywheel.flows import schedule as deployments

    with prefect_server(params) as (_, where):
        gone = deployments.remove(name)
        typer.echo(f"removed deployment {gone.flow}/{gone.name} {where}")
        if gone.polled and gone.runs_on == "served":
            typer.echo("its `flywheel schedule serve` process still runs: stop it with Ctrl-C")


def schedule_row(item: Any) -> dict[str, str]:
    """One deployment as a row of `flywheel schedule list`."""
    from flywheel.flows.schedule import stamp

    return {
        "flow": item.flow,
        "name": item.name,
        "schedule": ", ".join(item.schedules) or "-",
        "active": "yes" if item.active else "paused",
        "runs on": item.runs_on + (" (polled)" if item.polled else ""),
        "next run": stamp(item.next_run),
        "last run": item.last_run or "-",
    }
