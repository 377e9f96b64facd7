"""Long-running and watching commands: `flywheel ui` (Prefect server + MLflow UI), `flywheel serve`
(the champion over HTTP) and `flywheel monitor` (drift of the served traffic)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from flywheel.cli.common import ParamsOption, user_errors
from flywheel.config import DEFAULT_PARAMS, load_config
from flywheel.tables import text_table


def ui(
    params: ParamsOption = DEFAULT_PARAMS,
    prefect_port: Annotated[
        int, typer.Option("--prefect-port", help="Port of the Prefect server (API and UI).")
    ] = 4200,
    mlflow_port: Annotated[
        int, typer.Option("--mlflow-port", help="Port of the MLflow UI.")
    ] = 5000,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="MLflow server worker processes.")
    ] = 1,
) -> None:
    """Start the Prefect server and the MLflow UI on 127.0.0.1 and keep them up until Ctrl-C.

    The Prefect server uses the project's Prefect database (.prefect/) and MLflow the project's
    tracking store (mlflow/), so every earlier `flywheel run` shows in both: flow runs with
    their task runs, logs and report artifacts; MLflow runs with params, metrics, artifacts and
    the registered models. Logs: .prefect/flywheel-ui/. While it runs, `flywheel schedule`
    uses this Prefect server. If one server stops by itself, the other is stopped too and the
    command exits with an error and that server's last log lines.
    """
    import os
    import signal

    from flywheel import servers

    with user_errors(params):
        root = params.resolve().parent
        home = servers.prefect_home(root)
        specs = ui_specs(root, home, prefect_port, mlflow_port, workers)
        typer.echo(
            f"starting the Prefect server and the MLflow UI (logs in {home / servers.LOG_DIR})"
        )
        if os.environ.get("PREFECT_API_URL"):
            typer.echo(
                f"note: PREFECT_API_URL is set ({os.environ['PREFECT_API_URL']}): `flywheel run` "
                "and `flywheel schedule` use that server, not this one"
            )
        # `kill` and a closed terminal stop it as cleanly as Ctrl-C
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.default_int_handler)
        try:
            run_ui(root, home, specs)
        except KeyboardInterrupt:
            typer.echo("stopped the Prefect server and the MLflow UI")


def ui_specs(
    root: Path, home: Path, prefect_port: int, mlflow_port: int, workers: int
) -> list[Any]:
    """The two servers of `flywheel ui`, once it is sure neither it nor its ports are taken."""
    from flywheel import servers

    running = servers.read_state(home)
    if running is not None:
        raise servers.ServerError(
            f"flywheel ui already runs (pid {running.pid}): Prefect {running.prefect_url}, "
            f"MLflow {running.mlflow_url}"
        )
    if prefect_port == mlflow_port:
        raise servers.ServerError("--prefect-port and --mlflow-port must differ")
    servers.check_port(prefect_port, "--prefect-port")
    servers.check_port(mlflow_port, "--mlflow-port")
    return [
        servers.prefect_spec(home, prefect_port),
        servers.mlflow_spec(root, mlflow_port, workers),
    ]


def run_ui(root: Path, home: Path, specs: list[Any]) -> None:
    """Run both servers, recorded in the project's Prefect home for `flywheel run` and
    `flywheel schedule` to find, until Ctrl-C or until one stops by itself (an error)."""
    import os

    from flywheel import servers
    from flywheel.tracking import display_uri, tracking_uri

    with servers.running(specs) as (prefect, mlflow):
        state = servers.UiState(
            prefect.spec.url, mlflow.spec.url, os.getpid(), prefect.pid, mlflow.pid
        )
        servers.write_state(home, state)
        try:
            typer.echo(f"Prefect UI  {prefect.spec.url}  (database {home})")
            typer.echo(f"MLflow UI   {mlflow.spec.url}  (store {display_uri(tracking_uri(root))})")
            typer.echo("Ctrl-C stops both.")
            stopped = servers.watch([prefect, mlflow])
        finally:
            servers.remove_state(home, state.pid)
        raise stopped.failure(f"stopped by itself (exit code {stopped.exited()})")


def serve(
    params: ParamsOption = DEFAULT_PARAMS,
    host: Annotated[
        str | None,
        typer.Option("--host", help="Address to bind (default serve.host: 127.0.0.1)."),
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", min=0, max=65535, help="Port (default serve.port).")
    ] = None,
    reload_seconds: Annotated[
        float | None,
        typer.Option(
            "--reload-seconds",
            min=0,
            help="Check the champion alias this often; 0: only on POST /reload "
            "(default serve.reload_seconds).",
        ),
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", help="uvicorn log level (debug, info, warning).")
    ] = "info",
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Allow a --host beyond loopback with no token set (/feedback and /reload "
            "open to anyone who reaches the port); refused without it.",
        ),
    ] = False,
) -> None:
    """Serve the champion model over HTTP (FastAPI + uvicorn) until Ctrl-C.

    POST /predict classifies one text or a batch; POST /feedback stores the right label for a
    text in the feedback store, which the next `flywheel run` merges into the data; GET
    /health, /model, /metrics (Prometheus); POST /reload. OpenAPI docs at /docs. When the
    champion alias moves (a promotion or `flywheel models rollback`) the server swaps to the
    new version without failing a request. Set the environment variable named by
    serve.token_env (FLYWHEEL_API_TOKEN) to require a bearer token on /feedback and /reload;
    a --host other than loopback (127.0.0.1, ::1, localhost) refuses to start without one
    unless --insecure is given. Limits (batch size, text length, long texts cut or refused) are
    in params.yaml `serve:`.
    """
    from flywheel.serving.app import serve as run_server

    with user_errors(params):
        cfg = load_config(params)
        run_server(cfg, host, port, reload_seconds, log_level, insecure)


def monitor(
    params: ParamsOption = DEFAULT_PARAMS,
    version: Annotated[
        str, typer.Option("--version", help="Registered version or alias to judge.")
    ] = "champion",
    window: Annotated[
        int | None,
        typer.Option(
            "--window", min=1, help="Newest N predictions of it (default monitor.window)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Report folder (default monitor.report_dir)."),
    ] = None,
) -> None:
    """Drift of the served traffic against the model's reference profile.

    Reads the server's prediction log (monitor.predictions_path) for the version's newest
    predictions and compares them with the profile saved with the model at export: PSI of text
    lengths and of confidences, predicted-label shift, and the rise in words outside the
    training vocabulary. Prints each figure with the retrain bound it is judged against and
    writes drift.json, drift.md, drift.png and drift.html (self-contained) to the report folder.
    """
    from flywheel import drift as drift_monitor

    with user_errors(params):
        cfg = load_config(params)
        result, reference = drift_monitor.monitor(cfg, version, window)
        folder = drift_monitor.write_report(
            result, reference, cfg, out.resolve() if out else cfg.resolve(cfg.monitor.report_dir)
        )
    span = f"from {result.first} to {result.last}" if result.rows else "none logged yet"
    typer.echo(f"version {result.model_version}: {result.rows} predictions ({span})")
    typer.echo(text_table(drift_monitor.table(result, cfg.retrain, cfg.monitor.min_window)))
    typer.echo(f"report: {folder / 'drift.html'}")
