"""`flywheel models list | compare | promote | rollback | history`: the registered models and their
aliases. Comparisons and promotions score on the current test split of params.yaml's data."""

from __future__ import annotations

from typing import Annotated

import typer

from flywheel.cli.common import ParamsOption, SetOption, collect_overrides, user_errors
from flywheel.config import DEFAULT_PARAMS, load_config
from flywheel.tables import text_table

models_app = typer.Typer(
    help="The registered models: list, compare, promote through the gates, roll back, history.\n\n"
    "Versions are named by number or alias (champion, previous, challenger). Store: "
    "MLFLOW_TRACKING_URI or the project's mlflow/ folder; model name: registry.model_name.",
    no_args_is_help=True,
)
ReasonOption = Annotated[
    str, typer.Option("--reason", "-r", help="Why: written to the audit log with the move.")
]


@models_app.command("list")
def models_list(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Every version, newest first: aliases, test scores, variant, latency, data version."""
    from flywheel.registry import ModelRegistry
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
    typer.echo(f"{registry.name} ({display_uri(registry.uri)})\n{text_table(rows)}")


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
    from flywheel.io import read_parquet
    from flywheel.promotion import compare_versions
    from flywheel.registry import ModelRegistry
    from flywheel.tasks.prepare import split_path

    with user_errors(params):
        cfg = load_config(params)
        test = read_parquet(split_path(cfg, "test"))
        result = compare_versions(ModelRegistry.of(cfg), cfg, a, b, test, limit)

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
        return f"\n{title}\n{text_table(rows)}"

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
    from flywheel.io import read_parquet
    from flywheel.models.graph import measure_latency
    from flywheel.promotion import manual_promotion
    from flywheel.registry import ModelRegistry
    from flywheel.tasks.prepare import split_path

    with user_errors(params):
        cfg = load_config(params, collect_overrides(sets))
        test = read_parquet(split_path(cfg, "test"))
        decision = manual_promotion(
            ModelRegistry.of(cfg), cfg, version, test, reason, force, measure=measure_latency
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
    from flywheel.promotion import cli_actor, rollback
    from flywheel.registry import ModelRegistry

    with user_errors(params):
        cfg, actor = load_config(params), cli_actor("rollback")
        with registry_lock(cfg.root, actor):  # alias moves one at a time
            entries = rollback(ModelRegistry.of(cfg), reason, actor)
    for entry in entries:
        typer.echo(entry.line())


@models_app.command("history")
def models_history(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Every alias move, oldest first: time, alias from -> to, who, why, metrics."""
    from flywheel.registry import ModelRegistry

    with user_errors(params):
        registry = ModelRegistry.of(load_config(params))
        entries = registry.history()
    if not entries:
        typer.echo(f"no alias moves recorded for {registry.name}")
    for entry in entries:
        typer.echo(entry.line())
