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
from flywheel.tasks.validate import DataValidationError
from flywheel.tasks.version import dir_md5

DVC = str(Path(sys.prefix) / "bin" / "dvc")


def locked_version(root: Path) -> str:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    (out,) = lock["stages"]["prepare"]["outs"]
    return out["md5"]


def dvc(root: Path, *args: str) -> str:
    done = subprocess.run([DVC, *args], cwd=root, capture_output=True, text=True, check=True)
    return done.stdout


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under data/prepared plus dvc.lock, to prove a failed run changed nothing."""
    files = {p: p.read_bytes() for p in (root / "data" / "prepared").rglob("*") if p.is_file()}
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
    return project, pipeline(params_path=project / "params.yaml")


def test_default_run_versions_the_prepared_data(done):
    root, result = done
    assert result.collect.rows == 12_808
    assert result.collect.rows_per_source == {"rotten_tomatoes": 12_808}
    assert result.validation.success
    counts = result.prepare.rows_per_split
    assert sum(counts.values()) == result.prepare.report.rows_out == 12_749
    assert abs(counts["test"] / 12_749 - 0.1) < 0.01
    assert result.version.committed
    assert result.data_version == locked_version(root) == dir_md5(root / "data" / "prepared")
    assert result.version.pushed_files == 5  # 4 files + the .dir listing
    remote = root.parent / "remote"
    assert sum(1 for p in remote.rglob("*") if p.is_file()) == 5
    assert "up to date" in dvc(root, "status")
    summary = (root / "data" / "prepared" / "summary.json").read_text()
    assert '"exact_duplicates": 56' in summary


def test_dvc_repro_agrees_with_the_flow(done):
    root, result = done
    assert "didn't change, skipping" in dvc(root, "repro")
    dvc(root, "repro", "--force")
    assert locked_version(root) == result.data_version
    assert "skipping" in dvc(root, "repro").lower()
    assert "up to date" in dvc(root, "status")


def test_failed_validation_stops_before_prepare_and_keeps_the_version(done):
    root, result = done
    before = snapshot(root)
    with pytest.raises(DataValidationError) as info:
        pipeline(params_path=root / "params.yaml", overrides={"validate.labels": ["fresh"]})
    summary = info.value.report.summary()
    assert "x label is one of fresh (5,405 of 12,808 rows)" in summary
    assert "row rotten_tomatoes:" in summary
    # What Prefect logs and stores in the flow-run state: the failed checks, no example rows.
    assert "x label is one of fresh" in str(info.value)
    assert "row rotten_tomatoes:" not in str(info.value)
    report_dir = root / "data" / "validation"
    assert str(report_dir / "result.json") in summary
    assert (report_dir / "docs" / "index.html").is_file()
    assert snapshot(root) == before
    assert dir_md5(root / "data" / "prepared") == result.data_version


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
    grown = pipeline(params_path=root / "params.yaml")
    assert grown.collect.rows_per_source["feedback"] == 30
    assert grown.prepare.report.pii_counts["phone"] == 30
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


def test_override_run_leaves_dvc_lock_alone(done, tmp_path):
    root, result = done
    lock = (root / "dvc.lock").read_bytes()
    source = tmp_path / "mine.csv"
    pd.DataFrame(
        {
            "review": [f"my review number {i}" for i in range(60)],
            "stars": ["good", "bad"] * 30,
        }
    ).to_csv(source, index=False)
    runner = CliRunner()
    out = runner.invoke(
        app,
        [
            "run",
            "--params",
            str(root / "params.yaml"),
            "--source",
            str(source),
            "--text-col",
            "review",
            "--label-col",
            "stars",
        ],
    )
    assert out.exit_code == 0, out.output
    assert f"60 rows ({source}: 60)" in out.output
    assert "dvc.lock left as is" in out.output
    assert (root / "dvc.lock").read_bytes() == lock
    assert dir_md5(root / "data" / "prepared") != result.data_version


BAD = {
    "nonexistent path": (None, "source path does not exist"),
    "empty file": (b"", "file is empty"),
    "header only": (b"text,label\n", "header only, no data rows"),
    "wrong columns": (b"review,stars\nok,1\n", "missing column(s) 'text', 'label'"),
    "non-UTF-8 bytes": ("text,label\ncaf\u00e9,pos\n".encode("latin-1"), "not valid UTF-8"),
    "ragged rows": (b"text,label\na,pos\nb,neg,extra\n", "Expected 2 fields in line 3"),
    "1 MB text": (
        b"text,label\n"
        + b"a" * 1_000_000
        + b",pos\n"
        + b"".join(b"t%d,%s\n" % (i, [b"pos", b"neg"][i % 2]) for i in range(60)),
        "text is at most 5,000 characters long (1 of 61 rows)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_source_is_a_clear_error_and_changes_nothing(done, tmp_path, case):
    root, _ = done
    payload, phrase = BAD[case]
    path = tmp_path / "input.csv"
    if payload is not None:
        path.write_bytes(payload)
    before = snapshot(root)
    out = CliRunner().invoke(
        app, ["run", "--params", str(root / "params.yaml"), "--source", str(path)]
    )
    assert out.exit_code in (1, 2), out.output
    assert phrase in out.output
    if case == "1 MB text":
        assert "row input.csv:1: label 'pos', text 'aaaa" in out.output
    else:
        assert str(path) in out.output
    assert snapshot(root) == before
