"""Retrain trigger decisions: below and above each bound, not-judged cases, cool-down and the
same-evidence rule, forcing, and the firing record."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from flywheel.config import RetrainConfig
from flywheel.drift import Drift
from flywheel.trigger import (
    NO_NEW_DATA,
    STATE_FILE,
    Evidence,
    Firing,
    TriggerStateError,
    decide,
    finish_firing,
    last_firing,
    write_firing,
)

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
    base = Drift("3", 500, True, 0.01, 0.02, 0.01, 0.0, 0.05, "t0", "t1", [], [], [], {}, 401, 900)
    return replace(base, **changes)


def evidence(**changes) -> Evidence:
    base = Evidence(
        champion="3",
        watermark=10,
        newest_feedback=40,
        new_feedback=30,
        feedback_accuracy=0.9,
        feedback_scored=30,
        drift=calm_drift(),  # predictions 401-900
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


def firing(minutes_ago: float, ev: Evidence, outcome: str = "not promoted", ended=True) -> Firing:
    at = NOW - timedelta(minutes=minutes_ago)
    finished = at.isoformat() if ended else None
    return Firing(at.isoformat(), ev.fingerprint(), outcome, finished)


def test_the_cool_down_counts_from_the_end_of_the_last_retrain():
    strong = evidence(new_feedback=500, newest_feedback=1000)
    assert decide(strong, RC, None, NOW).fire
    more = replace(strong, newest_feedback=2000)  # plenty of new evidence, but too soon
    cooling = decide(more, RC, firing(10, strong), NOW)
    assert not cooling.fire and cooling.blocked.startswith(
        "cool-down: the last retrain ended 10 min"
    )
    unfinished = decide(more, RC, firing(10, strong, "running", ended=False), NOW)
    assert unfinished.blocked.startswith("cool-down: the last retrain fired 10 min ago")
    assert decide(more, RC, firing(61, strong), NOW).fire
    ended_late = (NOW - timedelta(minutes=10)).isoformat()
    long_retrain = replace(firing(120, strong), finished_at=ended_late)  # fired 2 h ago
    blocked = decide(more, RC, long_retrain, NOW).blocked
    assert blocked.startswith("cool-down: the last retrain ended 10 min ago")


def test_the_same_evidence_does_not_fire_twice():
    strong = evidence(new_feedback=500, newest_feedback=1000)
    old = firing(61, strong)
    same = decide(strong, RC, old, NOW)
    assert not same.fire and same.blocked.startswith("same evidence as the retrain fired at")
    # new traffic alone is no new feedback evidence ...
    traffic = replace(strong, drift=calm_drift(first_seq=4501, last_seq=5000))
    assert not decide(traffic, RC, old, NOW).fire
    # ... nor is a trickle of feedback: the count needs min_feedback (100) rows anew
    assert not decide(replace(strong, newest_feedback=1099), RC, old, NOW).fire
    assert decide(replace(strong, newest_feedback=1100), RC, old, NOW).fire


def test_low_feedback_accuracy_refires_on_enough_new_rows():
    poor = evidence(feedback_accuracy=0.5, feedback_scored=300, newest_feedback=1000)
    old = firing(120, poor)
    assert not decide(replace(poor, newest_feedback=1049), RC, old, NOW).fire
    assert decide(replace(poor, newest_feedback=1050), RC, old, NOW).fire  # 50 rows anew


def test_drift_refires_only_on_a_window_logged_after_the_firing():
    drifting = evidence(drift=calm_drift(length_psi=0.9, first_seq=400, last_seq=900))
    old = firing(120, drifting)
    overlapping = replace(drifting, drift=replace(drifting.drift, first_seq=800, last_seq=1300))
    assert not decide(overlapping, RC, old, NOW).fire
    fresh = replace(drifting, drift=replace(drifting.drift, first_seq=901, last_seq=1500))
    assert decide(fresh, RC, old, NOW).fire


@pytest.mark.parametrize(
    "outcome",
    ["failed", "running"],  # running with the slot free: the retrain was killed
)
def test_a_failed_or_interrupted_retrain_is_tried_again_after_the_cool_down(outcome):
    strong = evidence(new_feedback=500)
    assert decide(strong, RC, firing(61, strong, outcome, ended=outcome == "failed"), NOW).fire
    assert not decide(strong, RC, firing(30, strong, outcome), NOW).fire


def test_a_new_champion_is_judged_afresh():
    strong = evidence(new_feedback=500)
    assert not decide(strong, RC, firing(61, strong), NOW).fire
    assert decide(replace(strong, champion="4"), RC, firing(61, strong), NOW).fire


def test_a_running_retrain_blocks_even_a_forced_one():
    busy = decide(evidence(new_feedback=500), RC, None, NOW, force=True, busy=True)
    assert (
        not busy.fire and busy.blocked == "another retrain is running (it holds the retrain slot)"
    )
    assert busy.headline() == "not fired: another retrain is running (it holds the retrain slot)"
    calm = decide(evidence(), RC, None, NOW, busy=True)  # said even when nothing is crossed
    assert not calm.fire and calm.headline().startswith("not fired: another retrain is running")


def test_forcing_and_no_champion():
    forced = decide(evidence(), RC, Firing(NOW.isoformat(), {}), NOW, force=True)
    assert forced.fire and forced.forced
    nobody = decide(evidence(champion=None, new_feedback=500), RC, None, NOW)
    assert not nobody.fire and nobody.headline().startswith("no champion")


def test_the_firing_record_round_trips_and_a_damaged_one_is_named(tmp_path):
    assert last_firing(tmp_path) is None
    decision = decide(evidence(new_feedback=500), RC, None, NOW)
    started = Firing(decision.decided_at, decision.evidence.fingerprint())
    write_firing(tmp_path, started)
    assert last_firing(tmp_path) == started and started.outcome == "running"
    finish_firing(tmp_path, "promoted", feedback_seq=75)  # rows that came in meanwhile
    done = last_firing(tmp_path)
    assert (done.at, done.outcome) == (started.at, "promoted") and done.finished_at
    assert done.evidence == started.evidence | {"feedback_seq": 75}
    assert "| feedback count | 500 new rows | >= 100 | **crossed** |" in decision.markdown()
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(TriggerStateError, match=r"last-firing.json: not a record .* delete"):
        last_firing(tmp_path)


def test_a_record_from_before_outcomes_reads_as_a_retrain_that_ended(tmp_path):
    strong = evidence(new_feedback=500)
    at = (NOW - timedelta(minutes=90)).isoformat()
    (tmp_path / STATE_FILE).parent.mkdir(parents=True)
    (tmp_path / STATE_FILE).write_text(json.dumps({"at": at, "evidence": strong.fingerprint()}))
    legacy = last_firing(tmp_path)
    assert (legacy.outcome, legacy.finished_at) == ("unrecorded", at)
    assert decide(strong, RC, legacy, NOW).blocked.startswith("same evidence")


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("[1, 2]", "not a JSON object"),
        ('{"at": "yesterday", "evidence": {}, "outcome": "failed"}', "Invalid isoformat"),
        ('{"at": null, "evidence": {}, "outcome": "failed"}', "at is None, not a time"),
        ('{"at": "2026-11-24T10:00:00", "evidence": {}, "outcome": "failed"}', "no time zone"),
        ('{"at": "2026-11-24T10:00:00+00:00", "evidence": [], "outcome": "failed"}', "evidence"),
        ('{"at": "2026-11-24T10:00:00+00:00", "when": 1}', "unexpected keyword"),
    ],
)
def test_a_damaged_record_is_an_error_naming_the_file(tmp_path, content, why):
    (tmp_path / STATE_FILE).parent.mkdir(parents=True)
    (tmp_path / STATE_FILE).write_text(content)
    with pytest.raises(TriggerStateError, match="last-firing.json: not a record") as error:
        last_firing(tmp_path)
    assert why in str(error.value)


def test_drift_without_new_labelled_rows_is_an_alert_that_trains_nothing():
    drifted = evidence(new_feedback=0, drift=calm_drift(length_psi=0.6))
    alert = decide(drifted, RC, None, NOW)
    assert alert.fire and crossed(alert) == ["drift"] and alert.nothing_to_train
    assert alert.headline().startswith(
        "drift without new labelled data: nothing new to train on (alert: drift: PSI length 0.600"
    )
    assert alert.markdown().startswith("# Retrain check: ALERT (no retrain)")
    # with new labelled rows the same drift retrains; a forced retrain always does
    with_rows = decide(replace(drifted, new_feedback=1), RC, None, NOW)
    assert with_rows.fire and not with_rows.nothing_to_train
    assert with_rows.headline().startswith("retrain fired: drift:")
    forced = decide(drifted, RC, None, NOW, force=True)
    assert forced.fire and not forced.nothing_to_train


def test_an_alert_is_not_repeated_on_the_same_drift_window(tmp_path):
    drifted = evidence(new_feedback=0, drift=calm_drift(length_psi=0.6))
    first = decide(drifted, RC, None, NOW)
    write_firing(tmp_path, Firing(first.decided_at, first.evidence.fingerprint()))
    finish_firing(tmp_path, NO_NEW_DATA, reasons=[first.headline()])
    recorded = last_firing(tmp_path)
    assert recorded.outcome == "no new data" and recorded.reasons == [first.headline()]
    ended = datetime.fromisoformat(recorded.finished_at)
    later = ended + timedelta(minutes=RC.cooldown_minutes + 1)
    assert decide(drifted, RC, recorded, later).blocked.startswith("same evidence")
    newer_window = calm_drift(length_psi=0.6, first_seq=901, last_seq=1400)
    assert decide(replace(drifted, drift=newer_window), RC, recorded, later).fire


def test_quarantined_or_repeated_feedback_is_not_new_data():
    drifted = evidence(new_feedback=7, usable_feedback=0, drift=calm_drift(length_psi=0.6))
    alert = decide(drifted, RC, None, NOW)
    assert alert.nothing_to_train
    assert "; 7 new feedback rows quarantined or repeats)" in alert.headline()
    usable = decide(replace(drifted, usable_feedback=2), RC, None, NOW)
    assert usable.fire and not usable.nothing_to_train
