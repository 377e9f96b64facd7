"""The `flywheel` command line: run the pipeline, validate a file, run one stage for DVC, manage
the registered models, look at runs (`ui`), schedule retraining (`schedule`)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from flywheel.config import DEFAULT_PARAMS, ConfigError, load_config, parse_override

app = typer.Typer(
    help="Flywheel: a Prefect-orchestrated MLOps pipeline for text classification.\n\n"
    "Start with `flywheel run` (the whole pipeline on params.yaml) or `flywheel validate FILE`.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",  # paragraphs re-wrapped to the terminal, `code` shown as code
    pretty_exceptions_enable=False,
)

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


@app.command()
def run(
    params: ParamsOption = DEFAULT_PARAMS,
    source: SourceOption = None,
    text_col: TextColOption = None,
    label_col: LabelColOption = None,
    labels: LabelsOption = None,
    sets: SetOption = None,
    profile: ProfileOption = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Run every stage, reusing nothing from the cache."),
    ] = False,
    force_from: Annotated[
        str | None,
        typer.Option(
            "--force-from",
            metavar="STAGE",
            help="Run this stage and every one after it (validate, prepare, baseline, train, "
            "evaluate, export, register, promote); earlier ones may still be reused.",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print, per stage, whether it would run or reuse its cached result and why; "
            "writes nothing to the project.",
        ),
    ] = False,
    data_only: Annotated[
        bool,
        typer.Option("--data-only", help="Stop after the data stages (no training)."),
    ] = False,
    no_wait: Annotated[
        bool,
        typer.Option(
            "--no-wait",
            help="If another run of this project is running, stop at once with an error naming "
            "it (exit code 2) instead of waiting for it to finish.",
        ),
    ] = False,
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
    from flywheel import runtime
    from flywheel.cache import ORDER, parse_stage

    with user_errors(params):
        overrides = collect_overrides(sets, source, text_col, label_col, labels)
        cfg = load_config(params, overrides, profile=profile)  # fail fast, before Prefect starts
        if force and force_from:
            raise ConfigError("--force runs every model stage; use it or --force-from, not both")
        stage = ORDER[0] if force else parse_stage(force_from) if force_from else None
        if dry_run:
            from flywheel.flows.plan import preview

            data_version, plan = preview(params.resolve(), overrides, profile, stage, data_only)
            typer.echo("collect and version always run; the data version would be " + data_version)
            typer.echo(plan.table())
            return
        if not data_only:
            runtime.select_device(cfg.train.device, cfg.train.precision)
        from flywheel import servers
        from flywheel.flows.limits import run_lock_path, runs_of
        from flywheel.flows.pipeline import pipeline
        from flywheel.locks import ensure_free

        if no_wait:  # fail fast, before Prefect starts; the flow checks again as it takes it
            ensure_free(run_lock_path(cfg.root), runs_of(cfg.root))

        with servers.ui_server(cfg.root) as url:
            if url is not None:
                typer.echo(f"flywheel ui is running: this run goes to its Prefect server ({url})")
            result = pipeline(
                params_path=params.resolve(),
                overrides=overrides or None,
                profile=profile,
                force_from=stage,
                data_only=data_only,
                wait=not no_wait,
            )
    for name, text in summary_lines(result).items():
        typer.echo(f"{name:>12}  {text}")


def export_line(export: Any) -> str:
    """The export's choice, its parity and speed, or why it stayed fp32."""
    graph = "optimized" if export.graph.applied else "not optimized"
    latency = (
        f"p95 {export.latency.p95_ms:.1f} ms per text (fp32 {export.fp32_latency.p95_ms:.1f}, "
        f"graph {graph}: {export.graph.speedup:.2f}x)"
    )
    if export.test is None:
        why = export.reasons[-1] if export.reasons else "no int8 candidate"
        return f"fp32 ONNX (no int8 variant passed: {why}); {latency} -> {export.directory}"
    kept = len(next(c for c in export.candidates if c.name == export.chosen).keep_fp32)
    return (
        f"{export.chosen} ({kept} node groups kept fp32): test agreement "
        f"{export.test.agreement:.2%}, accuracy loss {100 * export.test.accuracy_loss:.2f} pts, "
        f"{export.speedup:.2f}x fp32 speed, {latency} -> {export.directory}"
    )


def summary_lines(result: Any) -> dict[str, str]:
    """What a run did, one line per stage (the CLI's report of a PipelineResult)."""
    from flywheel import tracking

    report = result.prepare.report
    per_source = ", ".join(f"{k}: {v:,}" for k, v in result.collect.rows_per_source.items())
    splits = ", ".join(f"{k} {v:,}" for k, v in result.prepare.rows_per_split.items())
    lines = {
        "collect": f"{result.collect.rows:,} rows ({per_source}) -> {result.collect.raw_path}",
        "validate": f"{result.validation.headline} -> {result.validation.report_dir}",
        "prepare": f"{report.rows_out:,} rows kept ({splits}); dropped {report.exact_duplicates} "
        f"exact + {report.normalised_duplicates} normalised duplicates, "
        f"{report.conflicting_label_rows} with conflicting labels, "
        f"{report.emptied_by_cleaning} empty after cleaning -> {result.prepare.prepared_dir}",
        "PII masked": ", ".join(f"{k} {v:,}" for k, v in report.pii_counts.items()),
        "data version": f"{result.data_version} ({result.version.note})",
    }
    if result.evaluation is None:
        return lines | {"cache": cache_line(result.plan)}
    base, trained, ev = result.baseline, result.train, result.evaluation
    m, b = ev.report.metrics, ev.baseline.metrics
    resumed = (
        f", resumed at step {trained.resumed_from_step}"
        if trained.resumed_from_step is not None
        else ""
    )
    behaviour = ", ".join(
        f"{c.name} {c.cases - c.failures}/{c.cases}{'' if c.passed else ' FAILED'}"
        for c in ev.report.behaviour
    )
    lines |= {
        "baseline": f"TF-IDF + logistic regression (C={base.fit.chosen['C']:g}, "
        f"min_df={base.fit.chosen['min_df']:g}): test accuracy {b.accuracy:.4f}, "
        f"macro-F1 {b.macro_f1:.4f} ({base.fit.seconds:.0f} s)",
        "train": f"{trained.steps} steps on {trained.device} in {trained.seconds:.0f} s "
        f"({trained.samples_per_second:.1f} samples/s{resumed}); best val macro-F1 "
        f"{trained.best_val_macro_f1:.4f} at step {trained.best_step} -> {trained.model_dir}",
        "evaluate": f"test accuracy {m.accuracy:.4f} ({100 * ev.accuracy_gain:+.1f} pts vs "
        f"baseline), macro-F1 {m.macro_f1:.4f}, ECE {m.ece:.3f} -> {ev.report_dir}",
        "behaviour": behaviour,
        "export": export_line(result.export),
        "register": f"{result.registered.uri}: ONNX test accuracy "
        f"{result.registered.report.metrics.accuracy:.4f}, macro-F1 "
        f"{result.registered.report.metrics.macro_f1:.4f} -> {result.registered.report_dir}",
        "promote": result.promotion.summary()
        if result.promotion
        else "skipped: a one-off data run is registered, not promoted (see flywheel models "
        "promote)",
        "cache": cache_line(result.plan),
        "mlflow": tracking.run_url(result.mlflow_run),
    }
    return lines


def cache_line(plan: Any) -> str:
    """Which model stages ran and which reused their cached result."""
    done = plan.summary()
    reused = [s for s, how in done.items() if how == "reused"]
    ran = [s for s, how in done.items() if how == "ran"]
    return f"reused: {', '.join(reused) or 'nothing'}; ran: {', '.join(ran) or 'nothing'}"


@app.command("validate")
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


class StageName(StrEnum):
    collect = "collect"
    validate = "validate"
    prepare = "prepare"


@app.command()
def stage(
    name: Annotated[StageName, typer.Argument(help="collect, validate or prepare.")],
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Run one stage on params.yaml without Prefect (what dvc.yaml calls).

    It holds the project's run lock like `flywheel run`, so `dvc repro` never changes data/
    under a running pipeline (it waits for it)."""
    from flywheel.flows.limits import run_lock
    from flywheel.tasks.collect import collect
    from flywheel.tasks.prepare import prepare
    from flywheel.tasks.validate import validate

    with user_errors(params):
        cfg = load_config(params)
        raw_path = cfg.resolve(cfg.data.raw_path)
        lock = run_lock(cfg.root, cfg.registry.model_name, f"flywheel stage {name.value}")
    with user_errors(params), lock:
        if name is StageName.collect:
            result = collect(cfg)
            typer.echo(f"collect: {result.rows:,} rows -> {result.raw_path}")
        elif name is StageName.validate:
            typer.echo(validate(cfg, raw_path).summary())
        else:
            prepared = prepare(cfg, raw_path)
            typer.echo(f"prepare: {prepared.rows_per_split} -> {prepared.prepared_dir}")


@app.command()
def config(
    params: ParamsOption = DEFAULT_PARAMS,
    sets: SetOption = None,
    profile: ProfileOption = None,
) -> None:
    """Print the resolved configuration (params.yaml with defaults, profile and --set)."""
    with user_errors(params):
        cfg = load_config(params, collect_overrides(sets), profile=profile)
    yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sys.stdout, sort_keys=False)


models_app = typer.Typer(
    help="The registered models: list, compare, promote through the gates, roll back, history.\n\n"
    "Versions are named by number or alias (champion, previous, challenger). Store: "
    "MLFLOW_TRACKING_URI or the project's mlflow/ folder; model name: registry.model_name.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")
ReasonOption = Annotated[
    str, typer.Option("--reason", "-r", help="Why: written to the audit log with the move.")
]


def current_test_split(cfg: Any) -> Any:
    """The test split of params.yaml's data, which gates and comparisons score on."""
    from flywheel.io import read_parquet

    return read_parquet(cfg.resolve(cfg.split.prepared_dir) / "test.parquet")


def table(rows: list[dict[str, str]]) -> str:
    """Rows as left-aligned columns under their keys."""
    if not rows:
        return ""
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]}
    lines = ["  ".join(k.ljust(w) for k, w in widths.items())]
    lines += ["  ".join(r[k].ljust(w) for k, w in widths.items()) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


@models_app.command("list")
def models_list(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Every version, newest first: aliases, test scores, variant, latency, data version."""
    from flywheel.tasks.registry import ModelRegistry
    from flywheel.tracking import display_uri

    with user_errors(params):
        registry = ModelRegistry.of(load_config(params))
        versions = registry.versions()
    if not versions:
        typer.echo(f"no versions of {registry.name} in {display_uri(registry.uri)}")
        return
    rows = [
        {
            "version": v.version,
            "aliases": ",".join(v.aliases) or "-",
            "created (UTC)": v.created.replace("T", " ")[:16],
            "macro-F1": v.tags.get("flywheel.test.macro_f1", "?")[:6],
            "accuracy": v.tags.get("flywheel.test.accuracy", "?")[:6],
            "variant": v.tags.get("flywheel.variant", "?"),
            "p95 ms": v.tags.get("flywheel.latency.p95_ms", "?"),
            "data version": v.tags.get("flywheel.data_version", "?")[:12],
            "gates": v.tags.get("flywheel.promotion", "-"),
        }
        for v in versions
    ]
    typer.echo(f"{registry.name} ({display_uri(registry.uri)})\n{table(rows)}")


@models_app.command("compare")
def models_compare(
    a: Annotated[str, typer.Argument(help="Version number or alias, e.g. champion.")],
    b: Annotated[str, typer.Argument(help="Version number or alias, e.g. 4.")],
    params: ParamsOption = DEFAULT_PARAMS,
    limit: Annotated[int, typer.Option(help="Disagreements to list.")] = 20,
) -> None:
    """Score A and B on the current test split and show where they differ.

    Metrics, per-class F1 and per-slice accuracy side by side (delta = B - A); the promotion
    gates' verdict on B as a candidate against A (paired intervals of B - A, overall and per
    slice; latency is not measured here); then the texts on which their labels disagree."""
    from flywheel.tasks.registry import ModelRegistry, compare_versions

    with user_errors(params):
        cfg = load_config(params)
        result = compare_versions(
            ModelRegistry.of(cfg), cfg, a, b, current_test_split(cfg), limit
        )

    def section(title: str, values: dict[str, tuple], label: str) -> str:
        rows = [
            {
                label: name,
                f"v{result.a}": f"{pair[0]:.4f}" if pair[0] is not None else "-",
                f"v{result.b}": f"{pair[1]:.4f}" if pair[1] is not None else "-",
                "delta": f"{pair[1] - pair[0]:+.4f}" if None not in pair[:2] else "-",
                **({"rows": str(pair[2])} if len(pair) > 2 else {}),
            }
            for name, pair in values.items()
        ]
        return f"\n{title}\n{table(rows)}"

    typer.echo(f"versions {result.a} and {result.b} on the current test split ({result.rows} rows)")
    typer.echo(section("metrics", result.metrics, "metric"))
    typer.echo(section("per-class F1", result.per_class, "label"))
    typer.echo(section("per-slice accuracy", result.slices, "slice"))
    verdict, pair = result.verdict, result.verdict.paired
    typer.echo(
        f"\ngates: v{result.b} as candidate against v{result.a} ({pair.confidence:.0%} "
        f"paired-bootstrap intervals of v{result.b} - v{result.a}, {pair.resamples:,} "
        f"resamples; exact McNemar p = {pair.mcnemar_p:.3g})"
    )
    for line in verdict.lines():
        typer.echo(f"  {line}")
    outcome = "would pass" if verdict.passed else "would fail: " + "; ".join(verdict.reasons)
    typer.echo(f"  => v{result.b} {outcome}")
    shown = len(result.disagreements)
    typer.echo(
        f"\n{result.disagree} disagreement{'' if result.disagree == 1 else 's'} "
        f"({result.disagree / result.rows:.2%})" + (f", first {shown}:" if shown else "")
    )
    for row in result.disagreements:
        text = row["text"] if len(row["text"]) <= 90 else row["text"][:87] + "..."
        typer.echo(f"  true {row['label']}: v{result.a} {row['a']}, v{result.b} {row['b']}: {text}")


@models_app.command("promote")
def models_promote(
    version: Annotated[str, typer.Argument(help="Version number or alias to make champion.")],
    reason: ReasonOption,
    params: ParamsOption = DEFAULT_PARAMS,
    sets: SetOption = None,
    force: Annotated[
        bool, typer.Option("--force", help="Promote even if gates fail (logged as forced).")
    ] = False,
) -> None:
    """Make VERSION champion if it passes the promotion gates.

    The gates of params.yaml's `registry` section, with VERSION and the champion both scored on
    the current test split and VERSION's latency measured now. Exit 1 (nothing moves) if a gate
    fails, unless --force (recorded as forced in the audit log)."""
    from flywheel.tasks.registry import ModelRegistry, manual_promotion

    with user_errors(params):
        cfg = load_config(params, collect_overrides(sets))
        decision = manual_promotion(
            ModelRegistry.of(cfg), cfg, version, current_test_split(cfg), reason, force
        )
    for line in decision.gate_lines():
        typer.echo(f"  {line}")
    typer.echo(decision.summary())
    raise typer.Exit(0 if decision.promoted else 1)


@models_app.command("rollback")
def models_rollback(
    params: ParamsOption = DEFAULT_PARAMS,
    reason: Annotated[
        str, typer.Option("--reason", "-r", help="Why: written to the audit log.")
    ] = "rollback",
) -> None:
    """Move `champion` back to the `previous` version (the rolled-back one becomes `previous`)."""
    from flywheel.locks import registry_lock
    from flywheel.tasks.registry import ModelRegistry, cli_actor, rollback

    with user_errors(params):
        cfg, actor = load_config(params), cli_actor("rollback")
        with registry_lock(cfg.root, actor):  # alias moves one at a time
            entries = rollback(ModelRegistry.of(cfg), reason, actor)
    for entry in entries:
        typer.echo(entry.line())


@models_app.command("history")
def models_history(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Every alias move, oldest first: time, alias from -> to, who, why, metrics."""
    from flywheel.tasks.registry import ModelRegistry

    with user_errors(params):
        registry = ModelRegistry.of(load_config(params))
        entries = registry.history()
    if not entries:
        typer.echo(f"no alias moves recorded for {registry.name}")
    for entry in entries:
        typer.echo(entry.line())


@app.command()
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
    from flywheel.tracking import display_uri, tracking_uri

    with user_errors(params):
        root = params.resolve().parent
        home = servers.prefect_home(root)
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
        specs = [
            servers.prefect_spec(home, prefect_port),
            servers.mlflow_spec(root, mlflow_port, workers),
        ]
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
            with servers.running(specs) as (prefect, mlflow):
                state = servers.UiState(
                    prefect.spec.url, mlflow.spec.url, os.getpid(), prefect.pid, mlflow.pid
                )
                servers.write_state(home, state)
                try:
                    typer.echo(f"Prefect UI  {prefect.spec.url}  (database {home})")
                    typer.echo(
                        f"MLflow UI   {mlflow.spec.url}  (store {display_uri(tracking_uri(root))})"
                    )
                    typer.echo("Ctrl-C stops both.")
                    stopped = servers.watch([prefect, mlflow])
                finally:
                    servers.remove_state(home, state.pid)
                raise stopped.failure(f"stopped by itself (exit code {stopped.exited()})")
        except KeyboardInterrupt:
            typer.echo("stopped the Prefect server and the MLflow UI")


@app.command()
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
) -> None:
    """Serve the champion model over HTTP (FastAPI + uvicorn) until Ctrl-C.

    POST /predict classifies one text or a batch; POST /feedback stores the right label for a
    text in the feedback store, which the next `flywheel run` merges into the data; GET
    /health, /model, /metrics (Prometheus); POST /reload. OpenAPI docs at /docs. When the
    champion alias moves (a promotion or `flywheel models rollback`) the server swaps to the
    new version without failing a request. Set the environment variable named by
    serve.token_env (FLYWHEEL_API_TOKEN) to require a bearer token on /feedback and /reload.
    Limits (batch size, text length, long texts cut or refused) are in params.yaml `serve:`.
    """
    from flywheel.serving.app import serve as run_server

    with user_errors(params):
        cfg = load_config(params)
        run_server(cfg, host, port, reload_seconds, log_level)


@app.command()
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
    typer.echo(table(drift_monitor.table(result, cfg.retrain, cfg.monitor.min_window)))
    typer.echo(f"report: {folder / 'drift.html'}")


@app.command()
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
    hourly check: `flywheel schedule --flow retrain`.
    """
    from flywheel import runtime, servers
    from flywheel.flows.retrain import retrain as retrain_flow

    with user_errors(params):
        cfg = load_config(params)
        runtime.select_device(cfg.train.device, cfg.train.precision)
        with servers.ui_server(cfg.root) as url:
            if url is not None:
                typer.echo(f"flywheel ui is running: this run goes to its Prefect server ({url})")
            result = retrain_flow(params_path=params.resolve(), if_needed=if_needed)
    typer.echo(table([check_row(c) for c in result.decision.checks]))
    typer.echo(result.decision.headline())
    if result.pipeline is not None:
        for name, text in summary_lines(result.pipeline).items():
            typer.echo(f"{name:>12}  {text}")
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


demo_app = typer.Typer(
    help="Scripted demonstrations on real data.", no_args_is_help=True, add_completion=False
)
app.add_typer(demo_app, name="demo")


@demo_app.command("feedback")
def demo_feedback(
    params: ParamsOption = DEFAULT_PARAMS,
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Server port (0: a free one).")
    ] = 0,
    limit: Annotated[
        int | None,
        typer.Option(
            "--snippets", min=10, help="Use this many snippets (seeded sample), not all of them."
        ),
    ] = None,
) -> None:
    """The feedback loop end to end: serve the champion, send it VADER's human-rated Amazon
    product review snippets, give half of them as feedback, let `flywheel retrain --if-needed`
    decide, and compare the old and the new champion on the held-back half.

    Needs a champion with a reference profile (runs `flywheel run` first if there is no
    champion). Takes about as long as one pipeline run. Writes reports/demo/feedback.json and
    feedback.md. The feedback rows stay in the project's feedback store (data/feedback/); the
    demo's ids make a second run add none.
    """
    from flywheel.demo import feedback_demo

    with user_errors(params):
        report = feedback_demo(params.resolve(), port, limit)
    typer.echo(
        f"old champion {report['old_champion']}: accuracy {report['old_accuracy']:.4f} on the "
        f"{report['held_back_rows']:,} held-back snippets"
    )
    if report["new_accuracy"] is not None:
        who = "new champion" if report["promoted"] else "candidate (not promoted)"
        typer.echo(
            f"{who} {report['candidate']}: accuracy {report['new_accuracy']:.4f} on the same"
        )
    if report["promotion"]:
        typer.echo(f"promotion: {report['promotion']}")
        for line in report["gates"]:
            typer.echo(f"  {line}")
    typer.echo(f"outcome: {report['outcome'] or 'not fired'}")
    typer.echo("report: reports/demo/feedback.md")


feedback_app = typer.Typer(
    help="The feedback store (data.feedback.path): list, show, delete and export rows.\n\n"
    "Deleting needs --yes and is logged in the store itself (table feedback_deletions).",
    no_args_is_help=True,
)
app.add_typer(feedback_app, name="feedback")


def shown(value: Any, width: int | None = None) -> str:
    """A stored value for a table: '-' when missing, cut to `width` characters."""
    import pandas as pd

    text = "-" if pd.isna(value) else str(value)
    return text if width is None or len(text) <= width else text[: width - 3] + "..."


def feedback_row(row: Any, reason: bool = False) -> dict[str, str]:
    """One feedback row for `feedback list` (with `reason`: why the next run leaves it out)."""
    return {
        "seq": shown(row["seq"]),
        "id": shown(row["id"]),
        "created (UTC)": shown(row["created_at"]).replace("T", " ")[:16],
        "label": shown(row["label"]),
        "predicted": shown(row["predicted_label"]),
        "source": shown(row["source"]),
        **({"left out": shown(row["reason"])} if reason else {}),
        "text": shown(row["text"], 60),
    }


@feedback_app.command("list")
def feedback_list(
    params: ParamsOption = DEFAULT_PARAMS,
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, help="Show at most this many rows.")
    ] = 20,
    label: Annotated[str | None, typer.Option("--label", help="Only rows with this label.")] = None,
    source: Annotated[
        str | None, typer.Option("--source", help="Only rows from this writer: api, demo, ...")
    ] = None,
    quarantined: Annotated[
        bool,
        typer.Option(
            "--quarantined",
            help="Only rows the next run leaves out of the data (quarantined by the row "
            "checks, or repeats), with the reason.",
        ),
    ] = False,
) -> None:
    """Stored feedback, newest first: seq, id, time, label, predicted label, source, text."""
    from flywheel import feedback
    from flywheel.sources import screen_feedback

    with user_errors(params):
        cfg = load_config(params)
        store = cfg.resolve(cfg.data.feedback.path)
        stored = screen_feedback(cfg) if quarantined else feedback.read(store)
        matching = feedback.select(stored, None, label, source, quarantined)
    rows = [feedback_row(row, quarantined) for _, row in matching.head(limit).iterrows()]
    typer.echo(
        f"{store}: {len(stored):,} rows, {len(matching):,} matching"
        + (f", newest {len(rows):,} shown" if rows else "")
    )
    if rows:
        typer.echo(table(rows))


@feedback_app.command("show")
def feedback_show(
    id: Annotated[str, typer.Argument(help="The row's id (see `flywheel feedback list`).")],
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """One row in full (every field, the whole text) and what the next run does with it; for a
    deleted row, when, by whom and why it was deleted."""
    from flywheel import feedback
    from flywheel.sources import screen_feedback

    with user_errors(params):
        cfg = load_config(params)
        store = cfg.resolve(cfg.data.feedback.path)
        found = feedback.select(screen_feedback(cfg), [id])
        gone = feedback.select(feedback.deletions(store), [id]) if found.empty else found
        if gone.empty:
            raise feedback.FeedbackError(f"{store}: no feedback with id {id}, stored or deleted")
    if found.empty:
        for _, row in gone.iterrows():
            typer.echo(
                f"{id} (seq {row['seq']}, label {row['label']}) was deleted at "
                f"{row['deleted_at']} by {row['user']}: {row['reason']}"
            )
        return
    row = found.iloc[0]
    for column in ("seq", *feedback.COLUMNS):
        typer.echo(f"{column:>15}: {shown(row[column])}")
    accepted = row["status"] == feedback.ACCEPTED
    verdict = "enters the data" if accepted else f"left out: {row['reason']}"
    typer.echo(f"{'next run':>15}: {row['status']}, {verdict}")


@feedback_app.command("delete")
def feedback_delete(
    ids: Annotated[list[str], typer.Argument(help="Ids of the rows to delete.")],
    params: ParamsOption = DEFAULT_PARAMS,
    reason: Annotated[
        str, typer.Option("--reason", "-r", help="Why: written to the deletion log.")
    ] = "no reason given",
    yes: Annotated[
        bool,
        typer.Option("--yes", "-y", help="Delete; without it, only show what would go (exit 1)."),
    ] = False,
) -> None:
    """Delete feedback rows by id: a wrong label, personal data that slipped through.

    Without --yes, lists the rows and exits 1, deleting nothing. With it, deletes them in one
    transaction and logs time, user, ids and reason in the store (table feedback_deletions;
    `flywheel feedback show ID` tells a deleted id). An unknown id deletes nothing (exit 2).
    The next run's data no longer holds the rows."""
    from flywheel import feedback

    with user_errors(params):
        cfg = load_config(params)
        store = cfg.resolve(cfg.data.feedback.path)
        user = f"{feedback.os_user()} via flywheel feedback delete"
        rows = feedback.delete(store, ids, user, reason, dry_run=not yes)
    typer.echo(table([feedback_row(row) for _, row in rows.iterrows()]))
    if not yes:
        typer.echo(f"would delete {len(rows):,} row(s) from {store}; nothing deleted: add --yes")
        raise typer.Exit(1)
    typer.echo(f"deleted {len(rows):,} row(s) from {store}, logged as {user!r}: {reason}")


@feedback_app.command("export")
def feedback_export(
    file: Annotated[Path, typer.Argument(help="Output file, *.csv or *.jsonl (by suffix).")],
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Write every stored row, with its seq, to FILE as CSV or JSONL (chosen by the suffix)."""
    from flywheel import feedback

    with user_errors(params):
        cfg = load_config(params)
        rows = feedback.export(cfg.resolve(cfg.data.feedback.path), file)
    typer.echo(f"{rows:,} rows written to {file}")


class ScheduledFlow(StrEnum):
    pipeline = "pipeline"
    retrain = "retrain"


@app.command()
def schedule(
    params: ParamsOption = DEFAULT_PARAMS,
    cron: Annotated[
        str | None,
        typer.Option(
            "--cron",
            metavar="EXPR",
            help='Retrain on this cron schedule, e.g. "0 3 * * 1" (Mondays at 03:00): creates '
            "or updates the deployment and serves it until Ctrl-C (or deploys it to --work-pool).",
        ),
    ] = None,
    flow: Annotated[
        ScheduledFlow,
        typer.Option(
            "--flow",
            help="pipeline: retrain on every run; retrain: check feedback and drift each run and "
            "retrain only when a bound is crossed (`flywheel retrain --if-needed`).",
        ),
    ] = ScheduledFlow.pipeline,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="Deployment name; the same name updates its schedule (default: retrain for "
            "the pipeline, if-needed for the retrain check).",
        ),
    ] = None,
    timezone: Annotated[
        str, typer.Option("--timezone", help="Time zone of --cron (IANA name).")
    ] = "UTC",
    work_pool: Annotated[
        str | None,
        typer.Option(
            "--work-pool",
            metavar="POOL",
            help="Deploy to this work pool (a process pool is created if missing) instead of "
            "serving here; runs start when a worker polls it: prefect worker start --pool POOL.",
        ),
    ] = None,
    list_: Annotated[
        bool, typer.Option("--list", help="List the pipeline's deployments and their schedules.")
    ] = False,
    remove: Annotated[
        str | None,
        typer.Option("--remove", metavar="NAME", help="Delete the deployment NAME."),
    ] = None,
) -> None:
    """Scheduled retraining: a Prefect deployment with a cron schedule.

    With --flow pipeline each scheduled run is `flywheel run` on --params; with --flow retrain
    it is `flywheel retrain --if-needed` (--cron defaults to retrain.cron, hourly). The Prefect
    server used: PREFECT_API_URL
    if set, else the running `flywheel ui`, else one started for this command (on the project's
    Prefect database, so deployments stay and show in `flywheel ui`). When the serving process
    stops, Prefect pauses the schedule until it is served again.
    """
    from flywheel import servers
    from flywheel.flows import schedule as deployments

    with user_errors(params):
        target = deployments.FLOWS[flow.value]
        name = name or target.default_deployment
        if flow is ScheduledFlow.retrain and not (cron or list_ or remove):
            cron = load_config(params).retrain.cron
        if sum(bool(action) for action in (cron, list_, remove)) != 1:
            raise ConfigError("give one of --cron EXPR, --list or --remove NAME")
        if work_pool and not cron:
            raise ConfigError("--work-pool goes with --cron")
        spec = deployments.parse_cron(cron, timezone) if cron else None
        if spec is not None:
            load_config(params)  # the runs will need it: fail now, not at 03:00
        root = params.resolve().parent
        with servers.prefect_api(root, lambda text: typer.echo(text, err=True)) as api:
            where = f"on {api.url.removesuffix('/api')} ({api.source})"
            if list_:
                found = deployments.deployments()
                if not found:
                    typer.echo(f"no Flywheel deployments {where}")
                    return
                typer.echo(f"Flywheel deployments {where}")
                typer.echo(table([schedule_row(item) for item in found]))
            elif remove:
                gone = deployments.remove(remove)
                typer.echo(f"removed deployment {gone.flow}/{gone.name} {where}")
                if gone.polled and gone.runs_on == "served":
                    typer.echo("its `flywheel schedule` process still runs: stop it with Ctrl-C")
            elif work_pool:
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
            else:
                typer.echo(
                    f"serving {target.flow_name}/{name} {where}: {spec}, next run "
                    f"{deployments.stamp(spec.next_run)}; Ctrl-C stops serving (the schedule "
                    "is paused until served again)"
                )
                deployments.serve(params, name, spec, target)
                typer.echo(f"stopped serving {target.flow_name}/{name}; schedule paused")


def schedule_row(item: Any) -> dict[str, str]:
    """One deployment as a row of `flywheel schedule --list`."""
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
