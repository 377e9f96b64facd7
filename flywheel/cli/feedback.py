"""`flywheel feedback list | show | delete | export`: the feedback store (data.feedback.path) row
by row; what the next run does with each row; deletions logged in the store itself."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from flywheel.cli.common import ParamsOption, user_errors
from flywheel.config import DEFAULT_PARAMS, load_config
from flywheel.tables import text_table

feedback_app = typer.Typer(
    help="The feedback store (data.feedback.path): list, show, delete and export rows.\n\n"
    "Deleting needs --yes and is logged in the store itself (table feedback_deletions).",
    no_args_is_help=True,
)


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
        typer.echo(text_table(rows))


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
    typer.echo(text_table([feedback_row(row) for _, row in rows.iterrows()]))
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
