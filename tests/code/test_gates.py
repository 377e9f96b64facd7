"""The promotion gates (flywheel/gates.py) on hand-made answers, with params.yaml's settings:
a model truly worse on one slice is rejected, two equally good models are not, a model better
on the feedback slice with a small dip elsewhere is promoted; each with its reason text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from flywheel import gates
from flywheel.config import load_config

ROOT = Path(__file__).resolve().parents[2]
RC = load_config(ROOT / "params.yaml").registry  # the real defaults
ROWS, FEEDBACK = 1400, 158  # like the demo's test split: movie rows, then feedback rows


def other(label: str) -> str:
    return "rotten" if label == "fresh" else "fresh"


@pytest.fixture(scope="module")
def split():
    """Truth, a champion right on ~85 % of rows, and the slices of the rows."""
    rng = np.random.default_rng(7)
    truth = list(rng.choice(["fresh", "rotten"], ROWS))
    right = rng.random(ROWS) < 0.85
    champion = [t if r else other(t) for t, r in zip(truth, right, strict=True)]
    index = np.arange(ROWS)
    slices = {
        "source=rotten_tomatoes": index < ROWS - FEEDBACK,
        "source=feedback": index >= ROWS - FEEDBACK,
        "length=0-59": index % 3 == 0,
        "length=60+": index % 3 != 0,
    }
    return truth, champion, slices, rng


def change(truth, answers, rows, make_right: bool) -> list[str]:
    """A copy of `answers` with `rows` made right (or wrong)."""
    out = list(answers)
    for i in rows:
        out[i] = truth[i] if make_right else other(truth[i])
    return out


def pick(rng, mask, condition, count) -> np.ndarray:
    rows = np.flatnonzero(mask & condition)
    return rng.choice(rows, count, replace=False)


def reanswer(split, mask=None, broken: int = 0, fixed: int = 0, answers=None) -> list[str]:
    """The champion's answers (or `answers`) with `broken` of its right answers made wrong and
    `fixed` of its wrong ones made right, at random rows of `mask` (default: all rows)."""
    truth, champion, _, rng = split
    right = np.array([t == c for t, c in zip(truth, champion, strict=True)])
    mask = np.ones(ROWS, dtype=bool) if mask is None else mask
    out = change(truth, answers or champion, pick(rng, mask, right, broken), make_right=False)
    return change(truth, out, pick(rng, mask, ~right, fixed), make_right=True)


def judge(truth, candidate, champion, slices, rc=RC, **candidate_kw):
    paired = gates.compare(truth, candidate, champion, slices, rc, seed=42)
    scores = dict(macro_f1=0.85, p95_ms=5.0) | candidate_kw
    return gates.judge(gates.Candidate("2", **scores), paired, rc), paired


def test_a_candidate_truly_worse_by_3_points_on_one_slice_is_rejected(split):
    truth, champion, slices, _ = split
    short = slices["length=0-59"]
    broken = round(0.03 * short.sum())  # 3 points of that slice
    candidate = reanswer(split, short, broken=broken)
    verdict, paired = judge(truth, candidate, champion, slices)
    assert not verdict.passed
    failed = {c.name: c.detail for c in verdict.checks if not c.passed}
    assert "length=0-59 accuracy" in failed
    text = failed["length=0-59 accuracy"]
    assert text.startswith("length=0-59 slice accuracy: -3.0 pts [")
    assert f"{short.sum():,} rows: worse (a significant loss: [-" in text
    assert text.endswith("corrected for the number of estimates judged)")
    assert paired.discordant == (0, broken)


def test_two_equally_good_models_differing_by_noise_are_not_rejected(split):
    truth, champion, slices, _ = split
    # 40 answers flipped each way: the same accuracy, 80 texts answered differently
    candidate = reanswer(split, broken=40, fixed=40)
    verdict, paired = judge(truth, candidate, champion, slices)
    assert verdict.passed, verdict.reasons
    overall = next(e for e in paired.estimates if e.slice == gates.OVERALL)
    assert overall.difference == pytest.approx(0.0)
    assert overall.low < 0 < overall.high  # noise: neither better nor worse
    assert overall.text().endswith("1,400 rows: not worse than -3 pts")
    assert paired.discordant == (40, 40) and paired.mcnemar_p == pytest.approx(1.0)


def test_better_on_feedback_with_a_small_insignificant_dip_elsewhere_is_promoted(split):
    truth, champion, slices, _ = split
    movie, feedback = slices["source=rotten_tomatoes"], slices["source=feedback"]
    candidate = reanswer(split, feedback, fixed=12)
    candidate = reanswer(split, movie, broken=26, fixed=20, answers=candidate)
    verdict, paired = judge(truth, candidate, champion, slices)
    assert verdict.passed, verdict.reasons
    by_name = {c.name: c.detail for c in verdict.checks}
    gain = by_name["source=feedback accuracy"]
    assert gain.startswith("source=feedback slice accuracy: +7.6 pts [")
    assert "158 rows: better ([+" in gain
    dip = by_name["source=rotten_tomatoes accuracy"]
    assert dip.startswith("source=rotten_tomatoes slice accuracy: -0.5 pts [")
    assert dip.endswith("1,242 rows: not worse than -3.19 pts")  # 3 x sqrt(1,400 / 1,242)

    # the same candidate when a significant gain is not required ... and when it is
    strict = RC.model_copy(update={"promote_without_gain": False})
    assert judge(truth, candidate, champion, slices, strict)[0].passed
    same = change(truth, champion, [], make_right=True)
    refused, _ = judge(truth, same, champion, slices, strict)
    assert refused.reasons == [
        "no judged estimate is significantly better (registry.promote_without_gain is false)"
    ]


def test_a_loss_the_interval_cannot_rule_out_fails_non_inferiority(split):
    """Not significantly worse, but the interval reaches below -margin: not shown to be within
    the margin, so not promoted."""
    truth, champion, _, _ = split
    candidate = reanswer(split, broken=150, fixed=137)
    verdict, paired = judge(truth, candidate, champion, {})
    overall = next(e for e in paired.estimates if e.metric == "accuracy")
    assert overall.verdict == gates.UNDECIDED and overall.high > 0 > -0.03 > overall.low
    assert "may be worse by more than 3 pts" in verdict.reasons[0]


def test_a_noisy_3_point_loss_on_one_slice_is_rejected(split):
    """Answers differ both ways on the slice (66 texts), netting 3 points worse: not
    significant after the correction, but not shown to be within the slice's margin."""
    truth, champion, slices, _ = split
    short = slices["length=0-59"]  # 467 rows: margin 3 x sqrt(1,400 / 467) = 5.19 points
    candidate = reanswer(split, short, broken=40, fixed=26)
    verdict, _ = judge(truth, candidate, champion, slices)
    failed = {c.name: c.detail for c in verdict.checks if not c.passed}
    assert set(failed) >= {"length=0-59 accuracy"}
    assert failed["length=0-59 accuracy"].startswith("length=0-59 slice accuracy: -3.0 pts [")
    assert failed["length=0-59 accuracy"].endswith(
        "467 rows: may be worse by more than 5.19 pts (not shown to be within the margin)"
    )


def test_equal_models_disagreeing_on_10_percent_pass_on_demo_sized_slices(split):
    """As two trainings of one recipe do: 140 texts answered differently, half each way."""
    truth, champion, slices, _ = split
    candidate = reanswer(split, broken=70, fixed=70)
    verdict, paired = judge(truth, candidate, champion, slices)
    assert verdict.passed, verdict.reasons
    assert paired.discordant == (70, 70)
    feedback = next(e for e in paired.estimates if e.slice == "source=feedback")
    assert feedback.rows == FEEDBACK and feedback.judged


def test_small_slices_are_reported_not_judged_and_the_floor_and_latency_stay(split):
    truth, champion, slices, _ = split
    tiny = {"source=tiny": np.arange(ROWS) < RC.min_slice_rows - 1}
    candidate = change(truth, champion, np.flatnonzero(tiny["source=tiny"])[:40], False)
    verdict, _ = judge(truth, candidate, champion, tiny)
    assert not any(c.name.startswith("source=tiny") for c in verdict.checks)
    assert verdict.notes[0].startswith("source=tiny slice accuracy: ")
    assert verdict.notes[0].endswith("99 rows: reported, not judged (too few rows)")

    ok = gates.judge(gates.Candidate("1", 0.81, 49.0), None, RC)
    assert ok.passed and [c.name for c in ok.checks] == ["min_test_macro_f1", "max_p95_latency_ms"]
    low = gates.judge(gates.Candidate("1", 0.79, 51.0), None, RC)
    assert low.reasons == [
        "test macro-F1 0.7900 vs minimum 0.8000",
        "p95 latency 51.0 ms vs bound 50.0 ms",
    ]


def test_models_with_different_label_sets_are_not_compared(split):
    truth, champion, slices, _ = split
    paired = gates.compare(
        truth, champion, champion, slices, RC, 1, ["fresh", "rotten"], ["neg", "pos"]
    )
    verdict = gates.judge(gates.Candidate("2", 0.9, 5.0), paired, RC)
    assert verdict.reasons == [
        "the models predict different label sets (candidate: fresh, rotten; champion: neg, "
        "pos): they cannot be compared"
    ]


def test_point_estimates_match_scikit_learn_and_resampling_is_seeded():
    rng = np.random.default_rng(3)
    labels = ["a", "b", "c", "d"]
    truth = list(rng.choice(labels, 300, p=[0.6, 0.2, 0.15, 0.05]))
    one = [t if rng.random() < 0.7 else rng.choice(labels) for t in truth]
    two = [t if rng.random() < 0.6 else "a" for t in truth]
    two[0] = "e"  # a label the truth never has: F1 0 for it, as scikit-learn scores it
    every = sorted({*labels, "e"})
    ours, theirs, resampled = gates.bootstrap(truth, one, two, every, 500, seed=9)
    for answers, mine in ((one, ours), (two, theirs)):
        assert mine[0] == pytest.approx(accuracy_score(truth, answers))
        assert mine[1] == pytest.approx(
            f1_score(truth, answers, labels=every, average="macro", zero_division=0)
        )
    assert theirs[1] == pytest.approx(f1_score(truth, two, average="macro"))
    again = gates.bootstrap(truth, one, two, every, 500, seed=9)[2]
    np.testing.assert_array_equal(resampled, again)
    assert not np.array_equal(resampled, gates.bootstrap(truth, one, two, every, 500, seed=10)[2])
    assert resampled.shape == (500, 2)
    with pytest.raises(ValueError, match=r"labels \['e'\] are not in the label set"):
        gates.bootstrap(truth, one, two, labels, 10, seed=9)


def test_exact_mcnemar():
    assert gates.exact_mcnemar(0, 0) == 1.0
    assert gates.exact_mcnemar(10, 10) == pytest.approx(1.0)
    assert gates.exact_mcnemar(0, 12) == pytest.approx(2 * 0.5**12)
