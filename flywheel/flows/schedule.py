"""Scheduled retraining: Prefect deployments with a cron schedule, of the pipeline flow (retrain
every time) or of the retrain flow (retrain when feedback or drift call for it).

`serve` serves a deployment from this process (`prefect.serve`, no work pool), `deploy_to_pool`
sends it to a work pool for a worker; both by module entrypoint. Calls go to the Prefect API the
process is configured for (`flywheel.servers.prefect_api`).
Why: docs/decisions/0008-schedules-and-local-servers.md.
"""

from __future__ import annotations

import asyncio
import importlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flywheel.errors import FlywheelError
from flywheel.runtime import OFFLINE_DEFAULTS
from flywheel.servers import prefect_home

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.responses import DeploymentResponse


@dataclass(frozen=True)
class Schedulable:
    """A flow that can be scheduled: its Prefect name, where it lives, fixed parameters."""

    flow_name: str
    entrypoint: str  # module.function
    default_deployment: str
    parameters: dict[str, Any] = field(default_factory=dict)

    def flow(self) -> Any:
        module, function = self.entrypoint.rsplit(".", 1)
        return getattr(importlib.import_module(module), function)


FLOWS = {
    "pipeline": Schedulable("flywheel-pipeline", "flywheel.flows.pipeline.pipeline", "retrain"),
    "retrain": Schedulable(
        "flywheel-retrain",
        "flywheel.flows.retrain.retrain",
        "if-needed",
        {"if_needed": True},
    ),
}
TAGS = ["flywheel", "scheduled-retraining"]
# Serving processes poll every 10 s, workers every 15 s; Prefect's own READY status lingers
# for minutes after they stop.
POLLED_WITHIN = timedelta(seconds=60)


class ScheduleError(FlywheelError):
    """A bad cron expression or time zone, or no such deployment."""


@dataclass(frozen=True)
class CronSpec:
    """A validated cron schedule and when it fires next."""

    cron: str
    timezone: str
    next_run: datetime

    def __str__(self) -> str:
        return f"{self.cron!r} ({self.timezone})"


def parse_cron(cron: str, timezone: str = "UTC") -> CronSpec:
    """Validate a 5-field cron expression and an IANA time zone; raise a ScheduleError that says
    what a valid one looks like."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.server.schemas.schedules import CronSchedule as ServerCronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        field = exc.errors()[0]["loc"][0] if exc.errors() else "cron"
        if field == "timezone":
            raise ScheduleError(
                f"unknown time zone {timezone!r}: use an IANA name, e.g. UTC or Europe/Berlin"
            ) from None
        raise ScheduleError(
            f"invalid cron expression {cron!r}: expected 5 fields, minute hour day-of-month "
            'month day-of-week, e.g. "0 3 * * 1" (Mondays at 03:00)'
        ) from None
    upcoming = asyncio.run(ServerCronSchedule(cron=cron, timezone=timezone).get_dates(n=1))
    return CronSpec(cron, timezone, upcoming[0])


def deployment_parameters(params_path: Path, flow: Schedulable) -> dict[str, Any]:
    """What every scheduled run is called with: the project's params.yaml, by absolute path."""
    return {"params_path": str(params_path.resolve()), **flow.parameters}


def serve(
    params_path: Path, name: str, spec: CronSpec, flow: Schedulable = FLOWS["pipeline"]
) -> None:
    """Create or update the deployment `name` and serve it until Ctrl-C (Prefect then pauses its
    schedule, so no runs pile up while nothing serves it).

    `prefect.serve` of a deployment rather than `pipeline.serve`: the latter runs each flow run
    from a cloudpickled copy of the flow function, whose globals lack the names only its
    annotations use (`Path`), so Prefect's parameter validation fails; a deployment is run by
    `python -m prefect.engine`, which imports the flow from its module.
    """
    from prefect import serve as serve_deployments
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    deployment = flow.flow().to_deployment(
        name=name,
        schedules=[Cron(spec.cron, timezone=spec.timezone)],
        parameters=deployment_parameters(params_path, flow),
        description=f"Scheduled retraining on {params_path.resolve()}",
        tags=TAGS,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    serve_deployments(deployment, print_starting_message=False)


def deploy_to_pool(
    params_path: Path, name: str, spec: CronSpec, pool: str, flow: Schedulable = FLOWS["pipeline"]
) -> bool:
    """Create or update the deployment `name` on the work pool `pool` (a process pool is created
    if there is none of that name). Returns whether the pool was created.

    The worker runs each flow run in the project folder with the CLI's offline settings, so a run
    picked up by `prefect worker start --pool NAME` behaves like `flywheel run`.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    root = params_path.resolve().parent
    created = False
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            created = True
    flow.flow().deploy(
        name=name,
        work_pool_name=pool,
        schedules=[Cron(spec.cron, timezone=spec.timezone)],
        parameters=deployment_parameters(params_path, flow),
        description=f"Scheduled retraining on {params_path.resolve()}",
        tags=TAGS,
        job_variables={
            "working_dir": str(root),
            "env": {**OFFLINE_DEFAULTS, "PREFECT_HOME": str(prefect_home(root))},
        },
        entrypoint_type=EntrypointType.MODULE_PATH,
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,
    )
    return created


@dataclass(frozen=True)
class Scheduled:
    """One deployment, as `flywheel schedule list` shows it."""

    flow: str  # the Prefect flow name
    name: str
    schedules: tuple[str, ...]  # "0 3 * * 1 (UTC)"
    active: bool  # not paused and at least one schedule active
    runs_on: str  # "served" or "pool NAME"
    polled: bool  # a serving process or worker asked for its runs within POLLED_WITHIN
    next_run: datetime | None
    last_run: str | None  # "<name> <STATE> <time>"


def describe(schedule: Any) -> str:
    """A deployment schedule in one line."""
    if getattr(schedule, "cron", None):
        return f"{schedule.cron} ({schedule.timezone or 'UTC'})"
    if getattr(schedule, "interval", None):
        return f"every {schedule.interval}"
    return str(getattr(schedule, "rrule", schedule))


def stamp(moment: datetime | None) -> str:
    """A time to the minute, UTC."""
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def runs_of(client: SyncPrefectClient, deployment_id: Any, scheduled: bool) -> list[Any]:
    """The next scheduled run, or the latest run that is not merely scheduled."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    kind = (
        FlowRunFilterStateType(any_=[StateType.SCHEDULED])
        if scheduled
        else FlowRunFilterStateType(not_any_=[StateType.SCHEDULED])
    )
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=kind)),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC if scheduled else FlowRunSort.START_TIME_DESC,
        limit=1,
    )


def summarize(client: SyncPrefectClient, flow: str, deployment: DeploymentResponse) -> Scheduled:
    """What `flywheel schedule list` shows of one deployment of the flow named `flow`."""
    upcoming = runs_of(client, deployment.id, scheduled=True)
    latest = runs_of(client, deployment.id, scheduled=False)
    last = None
    if latest:
        run = latest[0]
        last = f"{run.name} {run.state_type.value if run.state_type else '?'} " + stamp(
            run.start_time or run.expected_start_time
        )
    return Scheduled(
        flow=flow,
        name=deployment.name,
        schedules=tuple(describe(s.schedule) for s in deployment.schedules),
        active=not deployment.paused and any(s.active for s in deployment.schedules),
        runs_on=f"pool {deployment.work_pool_name}" if deployment.work_pool_name else "served",
        polled=deployment.last_polled is not None
        and datetime.now(UTC) - deployment.last_polled < POLLED_WITHIN,
        next_run=upcoming[0].expected_start_time if upcoming else None,
        last_run=last,
    )


def deployments() -> list[Scheduled]:
    """Every deployment of Flywheel's schedulable flows on the server, by flow and name."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [summarize(client, flow, d) for flow, d in flywheel_deployments(client)]


def flywheel_deployments(client: SyncPrefectClient) -> list[tuple[str, DeploymentResponse]]:
    """(flow name, deployment) of the pipeline and retrain flows, by flow and name."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    flows = FlowFilter(name=FlowFilterName(any_=[f.flow_name for f in FLOWS.values()]))
    names = {flow.id: flow.name for flow in client.read_flows(flow_filter=flows)}
    found = client.read_deployments(flow_filter=flows)
    return sorted(((names[d.flow_id], d) for d in found), key=lambda pair: (pair[0], pair[1].name))


def remove(name: str) -> Scheduled:
    """Delete the deployment `name` ("NAME" or "FLOW/NAME"; its scheduled runs go with it);
    returns what it was."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        every = flywheel_deployments(client)
        matches = [(f, d) for f, d in every if name in (d.name, f"{f}/{d.name}")]
        if len(matches) != 1:
            names = ", ".join(f"{f}/{d.name}" for f, d in every) or "none"
            what = "no deployment" if not matches else "more than one deployment"
            raise ScheduleError(f"{what} named {name!r} (deployments: {names}); use FLOW/NAME")
        gone = summarize(client, *matches[0])
        client.delete_deployment(matches[0][1].id)
    return gone
