import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flywheel.config import CleanConfig, SplitConfig
from flywheel.tasks.prepare import clean_frame, split_frame, split_of
from flywheel.text import clean_text, normalised_key


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  plain   text\n\there ", "plain text here"),
        ("R&amp;B &quot;hits&quot;", 'R&B "hits"'),
        ("great<br/>film <b>really</b>", "great film really"),
        ("a < b and c > d", "a < b and c > d"),  # not tags: kept
        ("ｆｕｌｌｗｉｄｔｈ ﬁlm", "fullwidth film"),  # NFKC
        ("zero\u200bwidth\u00a0space", "zerowidth space"),
        ("bell\x07char", "bellchar"),
        ("<B>Bold</B> and <p class='x'>para</p>", "Bold and para"),
        ("a <EMAIL> placeholder and a <PHONE>", "a <EMAIL> placeholder and a <PHONE>"),
        ("O'Brien <sean.obrien@example.ie>", "O'Brien <sean.obrien@example.ie>"),
        ("I <3 it", "I <3 it"),
    ],
)
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_normalised_key_ignores_case_punctuation_spacing():
    assert normalised_key("Great film!!") == normalised_key("great   FILM.")
    assert normalised_key("Great film") != normalised_key("Great films")


def raw(rows):
    frame = pd.DataFrame(rows, columns=["text", "label"]).astype("string")
    frame["source"] = "test"
    frame["origin"] = [f"t.csv:{i}" for i in range(1, len(frame) + 1)]
    return frame


def test_clean_frame_dedups_and_drops_conflicts():
    frame, report = clean_frame(
        raw(
            [
                ["Good film", "pos"],
                ["Good film", "pos"],  # exact duplicate
                ["good   FILM!", "pos"],  # normalised duplicate
                ["Awful <b>mess</b>", "neg"],
                ["Same words", "pos"],
                ["same words.", "neg"],  # conflicting label with the row above: both dropped
                ["<br/>", "neg"],  # empty after cleaning
                ["write to a@b.example.com", "pos"],
            ]
        ),
        CleanConfig(),
    )
    assert frame["text"].tolist() == ["Good film", "Awful mess", "write to <EMAIL>"]
    assert report.rows_in == 8
    assert report.emptied_by_cleaning == 1
    assert report.conflicting_label_rows == 2
    assert report.exact_duplicates == 1
    assert report.normalised_duplicates == 1
    assert report.rows_out == 3
    assert report.pii_counts["email"] == 1
    assert report.conflicts == [
        {"text": "Same words", "labels": ["neg", "pos"], "origins": ["t.csv:5", "t.csv:6"]}
    ]


def test_split_is_deterministic_and_seeded():
    cfg = SplitConfig()
    keys = [f"text {i}" for i in range(200)]
    first = [split_of(k, 42, cfg) for k in keys]
    assert first == [split_of(k, 42, cfg) for k in keys]
    assert first != [split_of(k, 7, cfg) for k in keys]


def test_split_ratios_hold_per_class():
    frame, _ = clean_frame(
        raw([[f"review {i} of film", "pos" if i % 3 else "neg"] for i in range(6000)]),
        CleanConfig(),
    )
    splits = split_frame(frame, 42, SplitConfig())
    total = sum(len(s) for s in splits.values())
    assert total == 6000
    for label in ("pos", "neg"):
        n = (frame["label"] == label).sum()
        for name, share in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
            got = (splits[name]["label"] == label).sum() / n
            assert abs(got - share) < 0.03, (label, name, got)


@settings(max_examples=25, deadline=None)
@given(
    base=st.lists(st.text(min_size=1, max_size=30), min_size=5, max_size=60, unique=True),
    extra=st.lists(st.text(min_size=1, max_size=30), max_size=40),
)
def test_text_keeps_its_split_when_data_grows(base, extra):
    before_frame, _ = clean_frame(raw([[t, "x"] for t in base]), CleanConfig())
    after_frame, _ = clean_frame(raw([[t, "x"] for t in extra + base]), CleanConfig())
    before = split_frame(before_frame, 42, SplitConfig())
    after = split_frame(after_frame, 42, SplitConfig())
    where_before = {i: name for name, part in before.items() for i in part["id"]}
    where_after = {i: name for name, part in after.items() for i in part["id"]}
    for text_id, split in where_before.items():
        assert where_after[text_id] == split
