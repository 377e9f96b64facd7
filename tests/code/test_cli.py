"""The command line: help everywhere, exit codes that scripts can rely on, a fast start."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from flywheel.cli import app
from tests.conftest import REPO, labelled_frame

runner = CliRunner()
PARAMS = ["--params", str(REPO / "params.yaml")]


COMMANDS = [
    [],
    ["run"],
    ["validate"],
    ["stage"],
    ["stages"],
    ["config"],
    ["serve"],
    ["monitor"],
    ["retrain"],
    ["bench"],
    ["schedule"],
    ["schedule", "add"],
    ["schedule", "serve"],
    ["schedule", "list"],
    ["schedule", "remove"],
    ["ui"],
    ["demo", "feedback"],
    ["models", "list"],
    ["models", "compare"],
    ["models", "promote"],
    ["models", "rollback"],
    ["models", "history"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "flywheel")
def test_every_command_has_help(command):
    out = runner.invoke(app, [*command, "--help"])
    assert out.exit_code == 0
    assert "Usage:" in out.output
    assert len(out.output.split()) > 20


HEAVY = ("torch", "prefect", "mlflow", "transformers", "pandas", "numpy", "fastapi")


def test_help_loads_no_heavy_module():
    """`flywheel --help` (and building every command) stays fast: the ML stack, the orchestrator
    and the tracker load inside the commands that use them."""
    code = (
        "import json, sys; from flywheel.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    modules = json.loads(done.stdout.splitlines()[-1])
    assert "flywheel.cli.schedule" in modules  # every group was built
    assert [m for m in modules if m.split(".")[0] in HEAVY] == []


def test_help_is_markdown_with_paths_kept():
    """Help is rendered as markdown (paragraphs re-wrapped to the terminal): a path with a
    placeholder must survive it, not vanish as an HTML tag."""
    wide = {"COLUMNS": "200"}
    out = runner.invoke(app, ["run", "--help"], env=wide)
    assert "data/runs/<key>/" in out.output
    served = runner.invoke(app, ["serve", "--help"], env=wide).output
    assert "stores the right label for a text in the feedback store" in served  # one line


def test_validate_exit_codes(tmp_path):
    good = tmp_path / "good.csv"
    labelled_frame(60).drop(columns=["origin"]).to_csv(good, index=False)
    out = runner.invoke(app, ["validate", str(good), *PARAMS, "--report-dir", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    assert "validation passed: 120 rows" in out.output
    assert (tmp_path / "r" / "result.json").is_file()

    bad = tmp_path / "bad.csv"
    labelled_frame(60).drop(columns=["origin"]).to_csv(bad, index=False)
    out = runner.invoke(
        app,
        [
            "validate",
            str(bad),
            *PARAMS,
            "--labels",
            "pos,neu",
            "--report-dir",
            str(tmp_path / "r2"),
        ],
    )
    assert out.exit_code == 1
    assert "x label is one of pos, neu (60 of 120 rows)" in out.output
    assert "row bad.csv:61: label 'neg'" in out.output


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["validate", "/nonexistent/missing.csv"], "source path does not exist"),
        (
            ["config", "--set", "split.train=0.5"],
            "split: train + val + test must sum to 1 (got 0.7)",
        ),
        (["config", "--set", "split.trian=0.5"], "'trian' is not a key of split"),
        (["run", "--label-col", "y"], "--text-col/--label-col need --source"),
        # checked before any stage runs (this machine has no GPU)
        (["run", "--set", "train.device=cuda"], "train.device is 'cuda' but no cuda device"),
        (["run", "--profile", "tpu"], "unknown profile 'tpu' (profiles: gpu)"),
        (["run", "--set", "evaluate.negative_label=null"], "set both positive_label and"),
    ],
)
def test_bad_input_or_config_is_exit_2_with_a_message(args, phrase):
    out = runner.invoke(app, [*args, *PARAMS])
    assert out.exit_code == 2
    assert phrase in out.output


def test_config_prints_resolved_values_with_overrides():
    out = runner.invoke(app, ["config", *PARAMS, "--set", "seed=7"])
    assert out.exit_code == 0
    assert "seed: 7" in out.output
    assert "max_text_chars: 5000" in out.output


def test_source_replaces_feedback_and_configured_labels_but_not_explicit_sets(tmp_path):
    from flywheel.cli.common import collect_overrides

    source = tmp_path / "mine.csv"
    plain = collect_overrides(None, source)
    assert plain["data.feedback.enabled"] is False
    assert plain["validate.labels"] is None
    explicit = collect_overrides(["validate.labels=[a, b]", "data.feedback.enabled=true"], source)
    assert explicit["validate.labels"] == ["a", "b"]
    assert explicit["data.feedback.enabled"] is True
    assert collect_overrides(None, source, labels="x, y")["validate.labels"] == ["x", "y"]


def test_stages_lists_every_declared_stage_in_order():
    from flywheel.flows.stages import STAGES

    out = runner.invoke(app, ["stages"])
    assert out.exit_code == 0, out.output
    names = [line.split()[0] for line in out.output.splitlines()[1 : 1 + len(STAGES)]]
    assert names == [s.name for s in STAGES]
    assert "validate  raw table     yes" in out.output  # keyed on, dvc


def test_stage_refuses_a_stage_dvc_does_not_run():
    out = runner.invoke(app, ["stage", "train", *PARAMS])
    assert out.exit_code == 2
    assert "unknown stage 'train' for flywheel stage (one of collect, validate, prepare)" in (
        out.output
    )
