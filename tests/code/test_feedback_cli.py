"""`flywheel feedback list | show | delete | export`: help everywhere, and each command on a
small store."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from flywheel import feedback
from flywheel.cli import app
from flywheel.feedback import FeedbackRecord
from tests.conftest import REPO

runner = CliRunner()
COMMANDS = [["feedback"], *(["feedback", c] for c in ("list", "show", "delete", "export"))]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_feedback_command_has_help(command):
    out = runner.invoke(app, [*command, "--help"])
    assert out.exit_code == 0
    assert "Usage:" in out.output
    assert len(out.output.split()) > 20


def test_every_feedback_option_and_argument_says_what_it_is_for():
    group = typer.main.get_command(app).commands["feedback"]
    assert set(group.commands) == {"list", "show", "delete", "export"}
    for name, command in group.commands.items():
        for param in command.params:
            assert getattr(param, "help", None), f"feedback {name}: {param.name} has no help"
        assert command.help, f"feedback {name} has no help"


@pytest.fixture
def project(tmp_path):
    """params.yaml in tmp_path and a store of five rows: two quarantined, one a repeat."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    store = tmp_path / "data" / "feedback" / "feedback.db"
    rows = [
        ("ok1", "A wonderful, moving film.", "fresh", "fresh"),
        ("ok2", "Dull and far too long. " * 4, "rotten", "fresh"),
        ("rep", "a wonderful moving film", "fresh", None),
        ("odd", "So-so.", "lukewarm", "fresh"),
        ("long", "x" * 5001, "rotten", None),
    ]
    feedback.add(
        store,
        [
            FeedbackRecord(text=t, label=y, predicted_label=p, id=i, source="api")
            for i, t, y, p in rows
        ],
    )
    return tmp_path, store


def cli(root, *args):
    return runner.invoke(app, [*args, "--params", str(root / "params.yaml")])


def test_list_shows_newest_first_with_filters(project):
    root, store = project
    out = cli(root, "feedback", "list")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0] == f"{store}: 5 rows, 5 matching, newest 5 shown"
    assert lines[1].split() == [
        "seq", "id", "created", "(UTC)", "label", "predicted", "source", "text"
    ]  # fmt: skip
    assert [line.split()[:2] for line in lines[2:]] == [
        ["5", "long"], ["4", "odd"], ["3", "rep"], ["2", "ok2"], ["1", "ok1"]
    ]  # fmt: skip
    assert "xxx..." in lines[2] and len(lines[2]) < 160  # the text is cut to a preview
    assert "-" in lines[4].split()  # rep has no predicted label
    one = cli(root, "feedback", "list", "--label", "rotten", "--limit", "1").output.splitlines()
    assert one[0].endswith("5 rows, 2 matching, newest 1 shown")
    assert one[2].split()[:2] == ["5", "long"]


def test_list_quarantined_shows_what_the_next_run_leaves_out_and_why(project):
    root, _ = project
    out = cli(root, "feedback", "list", "--quarantined")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert "3 matching" in lines[0] and "left out" in lines[1]
    rows = {line.split()[1]: line for line in lines[2:]}
    assert set(rows) == {"long", "odd", "rep"}  # ok1 and ok2 enter the data
    assert "longer than validate.max_text_chars (5,000)" in rows["long"]
    assert "label not in validate.labels" in rows["odd"]
    assert "same text and label as an earlier row" in rows["rep"]


def test_show_gives_the_whole_row_and_its_fate(project):
    root, _ = project
    out = cli(root, "feedback", "show", "ok2")
    assert out.exit_code == 0, out.output
    assert f"text: {'Dull and far too long. ' * 3}Dull and far too long." in out.output
    assert "predicted_label: fresh" in out.output and "prediction_id: -" in out.output
    assert "next run: accepted, enters the data" in out.output
    odd = cli(root, "feedback", "show", "odd").output
    assert "next run: quarantined, left out: label not in validate.labels" in odd
    missing = cli(root, "feedback", "show", "nope")
    assert missing.exit_code == 2 and "no feedback with id nope" in missing.output


def test_delete_needs_yes_is_logged_and_refuses_unknown_ids(project):
    root, store = project
    before = store.read_bytes()
    dry = cli(root, "feedback", "delete", "odd", "long")
    assert dry.exit_code == 1
    assert "would delete 2 row(s)" in dry.output and "nothing deleted: add --yes" in dry.output
    assert store.read_bytes() == before
    unknown = cli(root, "feedback", "delete", "odd", "nope", "--yes")
    assert unknown.exit_code == 2 and "no feedback with id nope; nothing deleted" in unknown.output
    assert len(feedback.read(store)) == 5
    done = cli(root, "feedback", "delete", "odd", "long", "--yes", "--reason", "bad label")
    assert done.exit_code == 0, done.output
    assert "deleted 2 row(s)" in done.output and "via flywheel feedback delete" in done.output
    assert feedback.read(store)["id"].tolist() == ["ok1", "ok2", "rep"]
    log = feedback.deletions(store)
    assert log["id"].tolist() == ["odd", "long"] and set(log["reason"]) == {"bad label"}
    shown = cli(root, "feedback", "show", "odd")
    assert shown.exit_code == 0
    assert "odd (seq 4, label lukewarm) was deleted at" in shown.output
    assert "via flywheel feedback delete: bad label" in shown.output


def test_export_writes_csv_or_jsonl_by_suffix(project, tmp_path):
    root, _ = project
    out = cli(root, "feedback", "export", str(tmp_path / "all.csv"))
    assert out.exit_code == 0 and "5 rows written" in out.output
    assert pd.read_csv(tmp_path / "all.csv")["id"].tolist() == ["ok1", "ok2", "rep", "odd", "long"]
    assert cli(root, "feedback", "export", str(tmp_path / "all.jsonl")).exit_code == 0
    assert len(pd.read_json(tmp_path / "all.jsonl", lines=True)) == 5
    bad = cli(root, "feedback", "export", str(tmp_path / "all.txt"))
    assert bad.exit_code == 2 and "cannot tell the format" in bad.output
