"""The data flow end to end: real Prefect (test harness), a real git + DVC repo, real GX."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from flywheel import feedback
from flywheel.cli import app
from flywheel.flows.pipeline import pipeline
from flywheel.flows.report import FAILURE_KEY, per_class_rows, summary_markdown
from flywheel.tasks.validate import DataValidationError
from flywheel.tasks.version import dir_md5
from tests.flows.conftest import flow_run_artifacts

DVC = str(Path(sys.prefix) / "bin" / "dvc")


def locked_version(root: Path) -> str:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    (out,) = lock["stages"]["prepare"]["outs"]
    return out["md5"]


def dvc(root: Path, *args: str) -> str:
    done = subprocess.run([DVC, *args], cwd=root, capture_output=True, text=True, check=True)
    return done.stdout


def snapshot(root: Path) -> dict[Path, bytes]:
    """dvc.lock and every file of the pipeline's data (not data/runs/), to prove what changed."""
    data = root / "data"
    files = {
        p: p.read_bytes() for p in data.rglob("*") if p.is_file() and data / "runs" not in p.parents
    }
    files[root / "dvc.lock"] = (root / "dvc.lock").read_bytes()
    return files


def split_table(result) -> pd.DataFrame:
    """id -> split of every prepared row of a run."""
    return pd.concat(
        pd.read_parquet(path, columns=["id"]).assign(split=name)
        for name, path in result.prepare.split_paths.items()
    )


@pytest.fixture
def done(project: Path):
    """The project after one successful default run."""
    return project, pipeline(params_path=project / "params.yaml", data_only=True)


def test_default_run_versions_the_prepared_data(done):
    root, result = done
    assert result.collect.rows == 12_808
    assert result.collect.rows_per_source == {"rotten_tomatoes": 12_808}
    assert result.validation.success
    counts = result.prepare.rows_per_split
    assert sum(counts.values()) == result.prepare.report.rows_out == 12_749
    assert abs(counts["test"] / 12_749 - 0.1) < 0.01
    assert result.version.pointer == root / "dvc.lock"
    assert result.data_version == locked_version(root) == dir_md5(root / "data" / "prepared")
    assert result.version.pushed_files == 6  # 4 files + output marker + the .dir listing
    remote = root.parent / "remote"
    assert sum(1 for p in remote.rglob("*") if p.is_file()) == 6
    assert "up to date" in dvc(root, "status")
    summary = (root / "data" / "prepared" / "summary.json").read_text()
    assert '"exact_duplicates": 56' in summary
    page = summary_markdown(result)  # the flow-run page's summary (published by report_task)
    assert "12,808 rows (rotten_tomatoes: 12,808)" in page
    assert "Data stages only (no model trained)." in page
    assert per_class_rows(result) == []


def test_dvc_repro_agrees_with_the_flow(done):
    root, result = done
    assert "didn't change, skipping" in dvc(root, "repro")
    dvc(root, "repro", "--force")
    assert locked_version(root) == result.data_version
    assert "skipping" in dvc(root, "repro").lower()
    assert "up to date" in dvc(root, "status")


def test_failed_validation_stops_before_prepare_and_keeps_the_version(done):
    root, result = done
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("labels: [fresh, rotten]", "labels: [fresh]"))
    before = snapshot(root)
    state = pipeline(params_path=params, data_only=True, return_state=True)
    assert state.is_failed()
    with pytest.raises(DataValidationError) as info:
        state.result()
    summary = info.value.report.summary()
    assert "x label is one of fresh (5,405 of 12,808 rows)" in summary
    assert "row rotten_tomatoes:" in summary
    # What Prefect logs and stores in the flow-run state: the failed checks, no example rows.
    assert "x label is one of fresh" in str(info.value)
    assert "row rotten_tomatoes:" not in str(info.value)
    report_dir = root / "data" / "validation"
    assert str(report_dir / "result.json") in summary
    assert (report_dir / "docs" / "index.html").is_file()
    # The report is new; the prepared data and dvc.lock are exactly as before.
    after = snapshot(root)
    assert {p for p in after if report_dir in p.parents} != set()
    unchanged = [p for p in before if report_dir not in p.parents]
    assert all(after[p] == before[p] for p in unchanged)
    assert dir_md5(root / "data" / "prepared") == result.data_version
    # The flow-run page says where and why it failed, and that nothing reached the registry.
    failure = flow_run_artifacts(state.state_details.flow_run_id)[FAILURE_KEY].data
    assert failure.startswith("# Flywheel run failed in `validate`")
    assert "**Cause:** Flow run encountered an exception: DataValidationError" in failure
    assert "x label is one of fresh" in failure
    assert "finished before it: collect (completed), plan (completed)" in failure
    assert "nothing was registered or promoted" in failure


def test_feedback_rows_enter_a_new_masked_data_version(done):
    root, result = done
    before = split_table(result)
    store = root / "data" / "feedback" / "feedback.db"
    feedback.add(
        store,
        [
            feedback.FeedbackRecord(
                text=f"Call me on +44 20 7946 09{i:02d}, film number {i} was dull",
                label="rotten",
                source="test",
                id=f"fb{i}",
            )
            for i in range(30)
        ],
    )
    grown = pipeline(params_path=root / "params.yaml", data_only=True)
    assert grown.collect.rows_per_source["feedback"] == 30
    assert grown.collect.pii_counts["phone"] == 30  # masked before the raw table was written
    assert grown.prepare.report.pii_counts["phone"] == 0
    assert grown.data_version != result.data_version
    assert grown.data_version == locked_version(root)
    prepared = pd.concat(pd.read_parquet(p) for p in grown.prepare.split_paths.values())
    from_feedback = prepared[prepared["source"] == "feedback"]
    assert len(from_feedback) == 30
    assert from_feedback["text"].str.contains("<PHONE>").all()
    assert not prepared["text"].str.contains("7946").any()
    # Texts already versioned kept their split.
    both = split_table(grown).merge(before, on="id", suffixes=("_new", "_old"))
    assert len(both) == 12_749
    assert (both["split_new"] == both["split_old"]).all()


def make_csv(path: Path, rows: int = 120) -> Path:
    pd.DataFrame(
        {
            "review": [f"my review number {i}" for i in range(rows)],
            "stars": ["good", "bad"] * (rows // 2),
        }
    ).to_csv(path, index=False)
    return path


def test_one_off_run_is_versioned_beside_the_pipeline_not_in_it(done, tmp_path):
    root, result = done
    feedback.add(
        root / "data" / "feedback" / "feedback.db",
        [feedback.FeedbackRecord(text="movie feedback", label="fresh")],
    )
    before = snapshot(root)
    source = make_csv(tmp_path / "mine.csv")
    args = [
        "run",
        "--data-only",
        "--params",
        str(root / "params.yaml"),
        "--source",
        str(source),
        "--text-col",
        "review",
        "--label-col",
        "stars",
    ]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert f"120 rows ({source}: 120)" in out.output  # feedback is not merged into --source
    (pointer,) = (root / "data" / "runs").glob("*/prepared.dvc")
    recorded = yaml.safe_load(pointer.read_text())["outs"][0]["md5"]
    assert recorded == dir_md5(pointer.with_suffix(""))
    assert f"data version  {recorded}" in out.output
    # 3 splits + summary + the .dir listing; the output marker is already on the remote from
    # the pipeline run (same bytes, content-addressed).
    assert "pushed 5 file(s)" in out.output
    assert snapshot(root) == before  # dvc.lock and data/{raw,validation,prepared} untouched
    assert dir_md5(root / "data" / "prepared") == result.data_version
    # The same one-off run again reuses its folder and version.
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert list((root / "data" / "runs").glob("*/prepared.dvc")) == [pointer]
    assert f"data version  {recorded}" in again.output


# Every other kind of bad source (missing, empty, header only, wrong columns, encodings, ragged
# rows...) is a case of tests/reliability/test_bad_input.py, through the same `flywheel run`.
BAD = {
    "1 MB text": (
        b"text,label\n"
        + b"a" * 1_000_000
        + b",pos\n"
        + b"".join(b"t%d,%s\n" % (i, [b"pos", b"neg"][i % 2]) for i in range(120)),
        1,
        "text is at most 5,000 characters long (1 of 121 rows)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_source_is_a_clear_error_and_changes_nothing(done, tmp_path, case):
    root, _ = done
    payload, exit_code, phrase = BAD[case]
    path = tmp_path / "input.csv"
    if payload is not None:
        path.write_bytes(payload)
    before = snapshot(root)
    out = CliRunner().invoke(
        app, ["run", "--data-only", "--params", str(root / "params.yaml"), "--source", str(path)]
    )
    assert out.exit_code == exit_code, out.output
    assert phrase in out.output
    if case == "1 MB text":
        assert "row input.csv:1: label 'pos', text 'aaaa" in out.output
    else:
        assert str(path) in out.output
    assert snapshot(root) == before
    assert not list((root / "data" / "runs").glob("*/prepared"))
