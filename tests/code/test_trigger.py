"""Retrain trigger decisions: below and above each bound, not-judged cases, cool-down and the
same-evidence rule, forcing, and the firing record."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from flywheel.config import RetrainConfig
from flywheel.tasks.monitor import Drift
from flywheel.tasks.trigger import Evidence, Firing, decide, last_firing, record_firing

RC = RetrainConfig(
    min_feedback=100,
    min_feedback_accuracy=0.8,
    min_feedback_for_accuracy=50,
    max_psi=0.25,
    max_label_shift=0.2,
    max_oov_drift=0.1,
    cooldown_minutes=60,
)
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def calm_drift(**changes) -> Drift:
    base = Drift("3", 500, True, 0.01, 0.02, 0.01, 0.0, 0.05, "t0", "t1", [], [], [], {})
    return replace(base, **changes)


def evidence(**changes) -> Evidence:
    base = Evidence(
        champion="3",
        watermark=10,
        newest_feedback=40,
        new_feedback=30,
        feedback_accuracy=0.9,
        feedback_scored=30,
        drift=calm_drift(),
        newest_prediction=900,
    )
    return replace(base, **changes)


def crossed(decision) -> list[str]:
    return [c.name for c in decision.checks if c.crossed]


def test_nothing_crossed_does_not_fire():
    decision = decide(evidence(), RC, None, NOW)
    assert not decision.fire and crossed(decision) == [] and decision.blocked is None
    assert decision.headline() == "not fired: every bound holds"


@pytest.mark.parametrize(("rows", "fires"), [(99, False), (100, True), (250, True)])
def test_feedback_count(rows, fires):
    decision = decide(evidence(new_feedback=rows), RC, None, NOW)
    assert decision.fire is fires
    assert crossed(decision) == (["feedback count"] if fires else [])


@pytest.mark.parametrize(
    ("accuracy", "scored", "fires", "note"),
    [
        (0.79, 60, True, ""),
        (0.80, 60, False, ""),  # at the bound: holds
        (0.10, 49, False, "not judged (fewer than 50 rows)"),
        (None, 0, False, "not judged (fewer than 50 rows)"),
    ],
)
def test_feedback_accuracy(accuracy, scored, fires, note):
    decision = decide(evidence(feedback_accuracy=accuracy, feedback_scored=scored), RC, None, NOW)
    check = next(c for c in decision.checks if c.name == "feedback accuracy")
    assert (decision.fire, check.crossed, check.note) == (fires, fires, note)


@pytest.mark.parametrize(
    ("changes", "fires"),
    [
        ({"length_psi": 0.26}, True),
        ({"confidence_psi": 0.25}, False),  # at the bound: holds
        ({"confidence_psi": 0.3}, True),
        ({"label_shift": 0.21}, True),
        ({"oov_drift": 0.11}, True),
        ({"oov_drift": 0.11, "judged": False, "rows": 20}, False),  # too few predictions
    ],
)
def test_drift(changes, fires):
    decision = decide(evidence(drift=calm_drift(**changes)), RC, None, NOW)
    assert decision.fire is fires
    check = next(c for c in decision.checks if c.name == "drift")
    if not changes.get("judged", True):
        assert check.note == "not judged (20 predictions in the window)"


def test_no_drift_figure_is_not_a_reason():
    decision = decide(evidence(drift=None, drift_note="no reference profile"), RC, None, NOW)
    assert not decision.fire
    assert next(c for c in decision.checks if c.name == "drift").note == "no reference profile"


def test_cool_down_and_the_same_evidence_do_not_fire_twice():
    strong = evidence(new_feedback=500)
    first = decide(strong, RC, None, NOW)
    assert first.fire
    fired = Firing((NOW - timedelta(minutes=10)).isoformat(), strong.fingerprint())
    more = replace(strong, newest_feedback=strong.newest_feedback + 5)
    cooling = decide(more, RC, fired, NOW)
    assert not cooling.fire and cooling.blocked.startswith("cool-down: fired 10 min ago")
    old = Firing((NOW - timedelta(minutes=61)).isoformat(), strong.fingerprint())
    same = decide(strong, RC, old, NOW)
    assert not same.fire and same.blocked.startswith("same evidence as the firing")
    assert decide(more, RC, old, NOW).fire  # new feedback after the cool-down: fires again
    newer_traffic = replace(strong, newest_prediction=strong.newest_prediction + 1)
    assert decide(newer_traffic, RC, old, NOW).fire


def test_forcing_and_no_champion():
    forced = decide(evidence(), RC, Firing(NOW.isoformat(), {}), NOW, force=True)
    assert forced.fire and forced.forced
    nobody = decide(evidence(champion=None, new_feedback=500), RC, None, NOW)
    assert not nobody.fire and nobody.headline().startswith("no champion")


def test_the_firing_record_round_trips(tmp_path):
    assert last_firing(tmp_path) is None
    decision = decide(evidence(new_feedback=500), RC, None, NOW)
    record_firing(tmp_path, decision)
    firing = last_firing(tmp_path)
    assert firing == Firing(decision.decided_at, decision.evidence.fingerprint())
    assert "| feedback count | 500 new rows | >= 100 | **crossed** |" in decision.markdown()
