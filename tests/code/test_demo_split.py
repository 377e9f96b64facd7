"""The demo's halves: stable whatever --snippets is, no text in both halves, texts with both
labels dropped, held-back texts already given as feedback dropped."""

from __future__ import annotations

import pandas as pd

from flywheel.cli.demo import snippet_key, split_halves


def frame(texts: list[str], labels: list[str] | None = None) -> pd.DataFrame:
    labels = labels or ["pos"] * len(texts)
    return pd.DataFrame(
        {"text": texts, "label": labels, "origin": [f"t:{i}" for i in range(len(texts))]}
    )


TEXTS = [f"snippet number {i} about a kettle" for i in range(400)]


def test_a_text_keeps_its_half_whatever_the_limit():
    full = split_halves(frame(TEXTS), seed=7)
    small = split_halves(frame(TEXTS), seed=7, limit=60)
    assert len(small.feedback) + len(small.held_back) == 60
    assert set(small.feedback["text"]) <= set(full.feedback["text"])
    assert set(small.held_back["text"]) <= set(full.held_back["text"])
    # a smaller limit takes a prefix of the same order
    assert set(split_halves(frame(TEXTS), 7, limit=30).feedback["text"]) <= set(
        small.feedback["text"]
    )
    assert 150 < len(full.feedback) < 250  # about half, by the hash
    assert set(full.feedback["text"]).isdisjoint(full.held_back["text"])


def test_the_seed_changes_the_halves():
    a = split_halves(frame(TEXTS), seed=1)
    b = split_halves(frame(TEXTS), seed=2)
    assert set(a.feedback["text"]) != set(b.feedback["text"])


def test_near_duplicates_are_kept_once_and_both_label_texts_dropped():
    texts = ["Great kettle!", "great kettle", "GREAT   kettle.", "Bad lid", "bad lid!", "Fine"]
    labels = ["pos", "pos", "pos", "neg", "pos", "pos"]
    halves = split_halves(frame(texts, labels), seed=0)
    kept = pd.concat([halves.feedback, halves.held_back])
    assert sorted(kept["text"].map(snippet_key)) == ["fine", "great kettle"]
    assert (halves.dropped_duplicates, halves.dropped_conflicting) == (2, 2)


def test_held_back_texts_already_given_as_feedback_are_dropped():
    full = split_halves(frame(TEXTS), seed=7)
    seen = frozenset(full.held_back["text"].head(5).map(snippet_key))
    again = split_halves(frame(TEXTS), seed=7, seen=seen)
    assert again.dropped_seen == 5 and len(again.held_back) == len(full.held_back) - 5
    assert again.feedback.equals(full.feedback)


def test_the_key_is_the_clean_stages_so_texts_differing_in_masked_pii_are_one():
    texts = ["Mail me at a@example.com, broken", "Mail me at b@example.org, broken", "Fine"]
    halves = split_halves(frame(texts), seed=0, pii=("email",))
    assert halves.dropped_duplicates == 1
    assert snippet_key(texts[0], ("email",)) == "mail me at <email> broken"
    unmasked = split_halves(frame(texts), seed=0)
    assert unmasked.dropped_duplicates == 0
