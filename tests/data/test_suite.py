"""The Great Expectations suite against the default data and against each kind of bad frame."""

import json

import pandas as pd
import pytest

from flywheel.config import EmbeddedSource, ValidateConfig, load_config
from flywheel.sources import read_embedded
from flywheel.tasks.validate import DataValidationError, run_suite
from tests.conftest import REPO, labelled_frame

CFG = ValidateConfig(labels=["pos", "neg"], min_rows_per_class=10, max_text_chars=200)


def failed(report) -> dict[str, object]:
    return {f.description: f for f in report.failures}


def test_default_data_passes_the_configured_suite(tmp_path):
    cfg = load_config(REPO / "params.yaml")
    report = run_suite(read_embedded(EmbeddedSource(kind="embedded")), cfg.validate_, tmp_path)
    assert report.success, report.summary()
    assert report.rows == 12_808
    assert report.evaluated == 13
    assert json.loads((tmp_path / "result.json").read_text())["success"] is True
    assert (tmp_path / "docs" / "index.html").is_file()
    assert "passed" in (tmp_path / "summary.txt").read_text()


def test_good_frame_passes(tmp_path):
    assert run_suite(labelled_frame(), CFG, tmp_path).success


def mutate(frame: pd.DataFrame, row: int, column: str, value) -> pd.DataFrame:
    frame = frame.copy()
    frame[column] = frame[column].astype(object)
    frame.loc[row, column] = value
    return frame


BAD = {
    "missing column": (lambda f: f.drop(columns=["label"]), "column 'label' is present", None),
    "null text": (lambda f: mutate(f, 4, "text", None), "text is not null", "sample.csv:5"),
    "empty text": (
        lambda f: mutate(f, 6, "text", "   "),
        "text has at least 1 non-blank character(s)",
        "sample.csv:7",
    ),
    "too long": (
        lambda f: mutate(f, 2, "text", "x" * 1_000_000),
        "text is at most 200 characters long",
        "sample.csv:3",
    ),
    "unknown label": (
        lambda f: mutate(f, 9, "label", "meh"),
        "label is one of pos, neg",
        "sample.csv:10",
    ),
    "one class": (lambda f: f[f["label"] == "pos"], "at least 2 distinct labels", None),
    "rare class": (
        lambda f: pd.concat([f, labelled_frame(3, ("odd",))], ignore_index=True),
        "every label has at least 10 rows",
        "sample.csv:1",
    ),
    "duplicates": (
        lambda f: pd.concat([f, f.head(20)], ignore_index=True),
        "at most 5.0% of texts repeat an earlier text",
        None,
    ),
    "imbalance": (
        lambda f: pd.concat(
            [labelled_frame(300, ("pos",)), labelled_frame(12, ("neg",))], ignore_index=True
        ),
        "largest class is at most 10x the smallest",
        None,
    ),
    "label spellings": (
        lambda f: mutate(mutate(f, 1, "label", "Pos "), 3, "label", "POS"),
        "no two labels differ only in case or spacing",
        "sample.csv:2",
    ),
}
# What each failure says would accept the data: the setting and its value, or the action.
FIXES = {
    "missing column": "name the text and label columns with --text-col / --label-col",
    "null text": "fill in or remove the rows without a text in the source",
    "empty text": "remove the blank texts from the source",
    "too long": "set validate.max_text_chars: 1000000 in params.yaml "
    "(or --set validate.max_text_chars=1000000)",
    "unknown label": "set validate.labels: [meh, neg, pos] in params.yaml",
    "one class": "a classifier needs at least 2 labels: add rows with another label",
    "rare class": "set validate.min_rows_per_class: 3 in params.yaml (or --set "
    "validate.min_rows_per_class=3) (label 'odd' has 3 rows)",
    "duplicates": "set validate.max_duplicate_rate: 0.25 in params.yaml",  # 20 of 80 rows
    "imbalance": "set validate.max_class_imbalance: 25 in params.yaml",  # 300 / 12
    "label spellings": "spell each label one way in the source: 'POS' / 'Pos ' / 'pos'",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_frame_fails_with_a_readable_summary(tmp_path, case):
    make, description, example_row = BAD[case]
    report = run_suite(make(labelled_frame()), CFG, tmp_path)
    assert not report.success
    failures = failed(report)
    assert description in failures, report.summary()
    summary = report.summary()
    assert f"x {description}" in summary
    assert f"fix: {FIXES[case]}" in summary
    assert f"fix: {FIXES[case]}" in str(DataValidationError(report))  # what a run prints
    assert str(tmp_path / "result.json") in summary
    if example_row:
        assert f"row {example_row}:" in summary
        assert failures[description].unexpected_count >= 1
    assert json.loads((tmp_path / "result.json").read_text())["success"] is False
    assert (tmp_path / "docs" / "index.html").is_file()


def test_missing_column_explains_dependent_checks(tmp_path):
    report = run_suite(labelled_frame().drop(columns=["text"]), CFG, tmp_path)
    not_null = failed(report)["text is not null"]
    assert 'column "text" does not exist' in not_null.error


def test_inferred_labels_need_a_minimum_per_class(tmp_path):
    cfg = ValidateConfig(labels=None, min_rows_per_class=10)
    frame = pd.concat([labelled_frame(), labelled_frame(4, ("typo",))], ignore_index=True)
    report = run_suite(frame, cfg, tmp_path)
    rare = failed(report)["every label has at least 10 rows"]
    assert rare.unexpected_count == 4
    assert "label is one of" not in report.summary()


def test_long_value_is_clipped_in_the_summary(tmp_path):
    report = run_suite(mutate(labelled_frame(), 2, "text", "y" * 1_000_000), CFG, tmp_path)
    line = next(x for x in report.summary().splitlines() if "row sample.csv:3" in x)
    assert len(line) < 200
    assert "1,000,000 chars" in line
