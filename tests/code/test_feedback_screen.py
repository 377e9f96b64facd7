"""Feedback hygiene between the store and the data: each row judged on its own (quarantine,
repeats), the collect stage leaving quarantined rows out, the gate's data-set checks judging
the other sources only, and the run summary saying what happened (docs/decisions/0010)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pandas as pd
import pytest

from flywheel import feedback
from flywheel.config import ValidateConfig, load_config
from flywheel.feedback import FeedbackRecord
from flywheel.flows.report import summary_markdown
from flywheel.flows.result import summary_lines
from flywheel.io import read_parquet
from flywheel.sources import screen_feedback
from flywheel.tasks.collect import collect
from flywheel.tasks.validate import run_suite
from tests.conftest import REPO, labelled_frame

MASK = ("url", "email", "iban", "card", "ip", "phone")
RULES = ValidateConfig(labels=["pos", "neg"], min_text_chars=2, max_text_chars=20)


def screened(rows: list[tuple[str | None, str | None]], rules=RULES, known=()) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "seq": range(1, len(rows) + 1),
            "id": [f"f{i}" for i in range(1, len(rows) + 1)],
            "text": pd.array([t for t, _ in rows], dtype="string"),
            "label": pd.array([y for _, y in rows], dtype="string"),
        }
    )
    return feedback.screen(frame, rules, MASK, known)


CASES = {
    # text, label -> status, reason (None: accepted)
    "a plain row": (("fine film", "pos"), "accepted", None),
    "exactly the longest": (("x" * 20, "pos"), "accepted", None),
    "one over the longest": (("x" * 21, "pos"), "quarantined", "longer than validate.max_text"),
    "exactly the shortest": ((" ab ", "neg"), "accepted", None),
    "one under the shortest": ((" a ", "neg"), "quarantined", "shorter than validate.min_text"),
    "punctuation only is text": (("!!", "pos"), "accepted", None),
    "blank": (("   ", "pos"), "quarantined", "empty"),
    "markup only": (("<br><p></p>", "pos"), "quarantined", "empty (nothing left after cleaning)"),
    "invisible only": (("\u200b\u200b\u200b", "pos"), "quarantined", "empty"),
    "no text": ((None, "pos"), "quarantined", "empty"),
    "no label": (("fine film", " "), "quarantined", "no label"),
    "unknown label": (("fine film", "meh"), "quarantined", "label not in validate.labels"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_each_row_is_judged_by_the_gates_row_checks(case):
    row, status, reason = CASES[case]
    out = screened([row]).iloc[0]
    assert out["status"] == status
    if reason is None:
        assert pd.isna(out["reason"])
    else:
        assert out["reason"].startswith(reason)


def test_with_inferred_labels_the_other_sources_labels_are_the_set():
    rules = RULES.model_copy(update={"labels": None})
    out = screened([("good one", "pos"), ("odd one", "odd")], rules, known={"pos", "neg"})
    assert out["status"].tolist() == ["accepted", "quarantined"]
    assert out["reason"].iloc[1] == "label not in the other sources' labels"


def test_a_repeat_is_dropped_and_a_conflict_is_kept_for_the_clean_stage():
    rows = [
        ("Great film!", "pos"),
        ("great FILM", "pos"),  # the same normalised text and label: a repeat
        ("Great film!", "neg"),  # another label: a conflict, resolved by the clean stage
        ("Mail a@b.com", "pos"),
        ("Mail c@d.org", "pos"),  # the same once masked
        ("x" * 30, "pos"),
        ("x" * 30, "pos"),  # a repeat of a quarantined row is quarantined, not a repeat
    ]
    out = screened(rows)
    assert out["status"].tolist() == [
        "accepted",
        "repeat",
        "accepted",
        "accepted",
        "repeat",
        "quarantined",
        "quarantined",
    ]
    summary = feedback.summarise(out)
    assert (summary.read, summary.accepted, summary.repeats, summary.newest_seq) == (7, 3, 2, 7)
    assert summary.quarantined == {"longer than validate.max_text_chars (20)": 2}
    assert summary.line() == (
        "7 feedback rows read: 3 accepted, 2 repeats dropped, 2 quarantined "
        "(2 longer than validate.max_text_chars (20))"
    )


@pytest.fixture
def project_cfg(tmp_path):
    """params.yaml's settings over a small CSV source and a feedback store in tmp_path."""
    source = tmp_path / "reviews.csv"
    labelled_frame(30, ("fresh", "rotten")).drop(columns=["origin"]).to_csv(source, index=False)
    return load_config(
        REPO / "params.yaml",
        {
            "data.sources": [{"kind": "path", "path": str(source)}],
            "data.feedback.path": str(tmp_path / "feedback.db"),
            "data.raw_path": str(tmp_path / "raw" / "raw.parquet"),
            "validate.max_text_chars": 40,
            "serve.max_text_chars": 40,
        },
    )


def test_collect_leaves_quarantined_rows_out_and_says_so(project_cfg, caplog):
    store = project_cfg.resolve(project_cfg.data.feedback.path)
    feedback.add(
        store,
        [
            FeedbackRecord(text="a fine film", label="fresh", id="good"),
            FeedbackRecord(text="A fine film!", label="fresh", id="again"),
            FeedbackRecord(text="x" * 41, label="fresh", id="long"),
        ],
    )
    first = collect(project_cfg)
    raw = read_parquet(first.raw_path)
    assert raw.loc[raw["source"] == "feedback", "origin"].tolist() == ["feedback:good"]
    assert first.rows == 61 and first.rows_per_source["feedback"] == 1
    assert first.feedback.line() == (
        "3 feedback rows read: 1 accepted, 1 repeats dropped, 1 quarantined "
        "(1 longer than validate.max_text_chars (40))"
    )
    assert first.feedback_seq == 3  # the watermark covers what was read, used or not

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flywheel.tasks.collect"):
        feedback.add(store, [FeedbackRecord(text="meh", label="lukewarm", id="odd")])
        second = collect(project_cfg)
    # Only a quarantined row came in: the data, hence its version, is the same bytes.
    assert second.raw_md5 == first.raw_md5 and second.feedback_seq == 4
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "2 quarantined" in warned[0].getMessage()
    assert "flywheel feedback list --quarantined" in warned[0].getMessage()

    feedback.add(store, [FeedbackRecord(text="a new text", label="rotten", id="new")])
    assert collect(project_cfg).raw_md5 != first.raw_md5  # an accepted row is new data


def test_screen_feedback_says_what_the_next_run_does_with_each_row(project_cfg):
    store = project_cfg.resolve(project_cfg.data.feedback.path)
    feedback.add(
        store,
        [
            FeedbackRecord(text="good", label="fresh", id="a"),
            FeedbackRecord(text="good", label="unknown", id="b"),
        ],
    )
    out = screen_feedback(project_cfg).set_index("id")
    assert out.loc["a", "status"] == "accepted" and out.loc["b", "status"] == "quarantined"


def with_source(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    return frame.assign(source=source)


def test_feedback_cannot_fail_the_data_set_checks_but_the_other_rows_still_can(tmp_path):
    rules = ValidateConfig(labels=["pos", "neg"], min_rows_per_class=10, max_class_imbalance=3)
    base = with_source(labelled_frame(), "reviews.csv")
    # 60 repeats of known texts and 200 rows of one class: 260 of 320 rows.
    repeats = with_source(base.head(60), "feedback")
    lopsided = with_source(labelled_frame(200, ("pos",)), "feedback")
    lopsided["text"] = lopsided["text"] + " again"
    passed = run_suite(pd.concat([base, repeats, lopsided], ignore_index=True), rules, tmp_path)
    assert passed.success, passed.summary()
    assert "260 feedback rows: row checks only" in passed.summary()
    # The same rows from another source fail both checks.
    as_base = pd.concat(
        [base, with_source(repeats, "more.csv"), with_source(lopsided, "more.csv")],
        ignore_index=True,
    )
    failed = run_suite(as_base, rules, tmp_path / "again")
    descriptions = {f.description for f in failed.failures}
    assert descriptions == {
        "at most 5.0% of texts repeat an earlier text",
        "largest class is at most 3x the smallest",
    }


def test_the_run_summary_has_the_feedback_line():
    summary = feedback.ScreenSummary(10, 7, 2, {"label not in validate.labels": 1}, 10)
    clean = SimpleNamespace(
        rows_out=7,
        pii_counts={},
        exact_duplicates=0,
        normalised_duplicates=0,
        conflicting_label_rows=0,
        emptied_by_cleaning=0,
    )
    result = SimpleNamespace(
        data_version="abc",
        version=SimpleNamespace(note="recorded"),
        collect=SimpleNamespace(
            rows=7,
            rows_per_source={"feedback": 7},
            feedback=summary,
            raw_path="raw.parquet",
            pii_counts={"email": 2},
        ),
        validation=SimpleNamespace(headline="validation passed", report_dir="v"),
        prepare=SimpleNamespace(report=clean, rows_per_split={"train": 7}, prepared_dir="p"),
        evaluation=None,
        plan=SimpleNamespace(summary=dict, steps={}),
    )
    line = "10 feedback rows read: 7 accepted, 2 repeats dropped, 1 quarantined "
    line += "(1 label not in validate.labels)"
    assert summary_lines(result)["feedback"] == line
    assert summary_lines(result)["PII masked"] == "email 2"  # collect's and prepare's together
    assert line in summary_markdown(result)  # the flow-run page
    result.collect.feedback = None  # feedback off
    assert "feedback" not in summary_lines(result)
    assert "feedback rows read" not in summary_markdown(result)
