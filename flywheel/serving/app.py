"""The HTTP API: the champion answers /predict, users correct it through /feedback.

`create_app` mounts a router per concern (routers/) over one `ServerState` (state.py): texts are
scored off the event loop, concurrent requests batched (scoring.py), answers logged for drift
(prediction_log.py), feedback goes to the store (feedback_intake.py), bad input is a 4xx saying
what is wrong (errors.py); `serve` runs it under uvicorn. Endpoints: docs/serving.md. Why one
process that swaps models in place: docs/decisions/0009.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from flywheel import __version__
from flywheel.config import Config
from flywheel.errors import FlywheelError
from flywheel.registry import ModelRegistry
from flywheel.serving.champion import ChampionSlot, RegistrySource
from flywheel.serving.errors import HANDLERS
from flywheel.serving.limits import BodyLimit, max_body_bytes
from flywheel.serving.metrics import RequestMetrics
from flywheel.serving.routers import admin, feedback, predict, status
from flywheel.serving.scoring import CountArrivals
from flywheel.serving.state import ServerState, token_guard


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServerState = app.state.flywheel
    state.slot.start()
    try:
        yield
    finally:
        state.slot.stop()
        await state.scorer.close()
        state.predictions.close()


class ExposedWithoutTokenError(FlywheelError):
    """`flywheel serve` asked to listen beyond this machine with /feedback and /reload open."""


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine: localhost or a loopback address
    (127.0.0.0/8, ::1). Any other name or address (0.0.0.0, a LAN address) is reachable from
    elsewhere."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None, token_env: str, insecure: bool) -> str | None:
    """Refuse to listen beyond this machine without a token: anyone who reaches the port could
    then write feedback (the next training data) and force reloads. Raises
    ExposedWithoutTokenError naming both ways out; returns the warning to print when `insecure`
    allows it anyway, None when there is nothing to say."""
    if token or is_loopback(host):
        return None
    if not insecure:
        raise ExposedWithoutTokenError(
            f"--host {host} makes the server reachable from other machines, and no token is set "
            f"(${token_env}): anyone could write feedback (the next training data) and force "
            f"reloads. Set {token_env}=<a long random secret> (clients send "
            "`Authorization: Bearer <it>`), bind 127.0.0.1, or pass --insecure if this network "
            "is trusted"
        )
    return (
        f"WARNING: serving on {host} with /feedback and /reload open to anyone who reaches it "
        f"(--insecure, no ${token_env})"
    )


def create_app(cfg: Config, slot: ChampionSlot, token: str | None = None) -> FastAPI:
    """The app around a loaded slot; `token` (if any) guards /feedback and /reload."""
    app = FastAPI(
        title="Flywheel",
        version=__version__,
        description="Text classification by the champion model of the MLflow registry, with "
        "feedback collection for the next retraining. Errors come as `{detail, errors}`.",
        lifespan=lifespan,
        exception_handlers=HANDLERS,
    )
    app.state.flywheel = state = ServerState.create(cfg, slot, token)
    if state.scorer.batching:
        app.add_middleware(CountArrivals, arrivals=state.scorer.arrivals)
    app.add_middleware(RequestMetrics, metrics=state.metrics)
    app.add_middleware(BodyLimit, limit=max_body_bytes(cfg.serve))  # outermost: before any read
    guarded = [token_guard(cfg.serve.token_env)]
    app.include_router(predict.router)
    app.include_router(feedback.router, dependencies=guarded)
    app.include_router(admin.router, dependencies=guarded)
    app.include_router(status.router)
    return app


# How long an idle connection stays open. Longer than the idle timeouts of clients and proxies
# (httpx 5 s, a load balancer's 60 s): with uvicorn's 5 s the server closed connections a busy
# client was just reusing, and that request failed with a reset (tests/reliability/test_load.py
# at 64 clients on a loaded machine).
KEEP_ALIVE_SECONDS = 75


def registry_slot(cfg: Config, poll_seconds: float) -> ChampionSlot:
    """A slot for the registry's champion (nothing loaded yet): what `flywheel serve` serves."""
    source = RegistrySource(ModelRegistry.of(cfg), cfg.serve.threads, cfg.serve.spin_threads)
    return ChampionSlot(source, poll_seconds)


def serve(
    cfg: Config,
    host: str | None = None,
    port: int | None = None,
    reload_seconds: float | None = None,
    log_level: str = "info",
    insecure: bool = False,
) -> None:
    """Load the champion and serve it with uvicorn until stopped (Ctrl-C, SIGTERM). A host
    beyond loopback needs a token, or `insecure` (`check_exposure`), checked before anything
    loads."""
    import os

    import uvicorn

    sc = cfg.serve
    token = os.environ.get(sc.token_env) or None
    host, port = host or sc.host, sc.port if port is None else port
    warning = check_exposure(host, token, sc.token_env, insecure)
    poll = sc.reload_seconds if reload_seconds is None else reload_seconds
    slot = registry_slot(cfg, poll)
    loaded = slot.reload()
    if warning:
        print(warning)
    print(
        f"serving {cfg.registry.model_name} version {loaded.current} on http://{host}:{port} "
        f"(docs: /docs; champion checked every {poll:g} s" + (")" if poll else ": off)")
    )
    print(
        f"/feedback and /reload need a bearer token (${sc.token_env})"
        if token
        else f"no token set (${sc.token_env}): /feedback and /reload are open"
    )
    uvicorn.run(
        create_app(cfg, slot, token),
        host=host,
        port=port,
        log_level=log_level,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        http=sc.http,
    )
