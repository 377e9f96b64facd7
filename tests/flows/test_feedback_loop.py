"""The feedback loop end to end on a small slice: a champion trained on movie snippets is
served, Amazon snippets are classified and half of them come back as feedback, the retrain
check fires, the pipeline retrains on data plus feedback, the gates decide and the server
follows the champion (`flywheel demo feedback` on 160 snippets)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import httpx
import pandas as pd
import pytest
import yaml

from flywheel.cli.demo import feedback_demo, served, snippet_key, snippets, split_halves
from flywheel.config import load_config
from flywheel.drift import Drift
from flywheel.flows import retrain as retrain_flow
from flywheel.flows.limits import retrain_slot
from flywheel.flows.pipeline import pipeline
from flywheel.flows.retrain import DECISION_ARTIFACT, OUTCOME_ARTIFACT, retrain
from flywheel.registry import CHAMPION, ModelRegistry
from flywheel.servers import free_port
from flywheel.tracking import FEEDBACK_SEQ_TAG
from flywheel.trigger import (
    ALREADY_CHAMPION,
    NO_NEW_DATA,
    NOT_PROMOTED,
    decide,
    gather,
    last_firing,
)
from tests.conftest import run
from tests.flows.conftest import (
    flow_run_artifacts,
    flywheel_logs_to_prefect,
    prefect_records,
    small_project,
)
from tests.serving.test_feedback_pii import MASKED_PII_TEXT, PII_TEXT, SEEDS, leaks, seed_forms

SNIPPETS = 160  # about half as feedback, the rest held back
# Source rows full of personal data, as a user's export of support messages may have them.
SOURCE_PII = [
    (
        f"Case {n}: my card {SEEDS['card']} and IBAN {SEEDS['iban']} were charged twice, call "
        f"{SEEDS['phone']} or mail {SEEDS['email']}; a {word} film",
        label,
    )
    for n, (word, label) in enumerate([("dull", "rotten"), ("great", "fresh")] * 4)
]


@pytest.fixture(scope="module")
def looped(tmp_path_factory):
    """A champion from the slice (with SOURCE_PII rows), one prediction and one feedback row
    full of personal data sent through the real server (which logs prediction texts), then the
    demo."""
    base = tmp_path_factory.mktemp("loop")
    root = small_project(base / "project", base / "remote")
    source = root / "data" / "sources" / "slice.csv"
    rows = pd.read_csv(source)
    pii_rows = pd.DataFrame(SOURCE_PII, columns=["text", "label"])
    pd.concat([rows, pii_rows], ignore_index=True).to_csv(source, index=False)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["retrain"].update(min_feedback=40, min_feedback_for_accuracy=20)
    params["monitor"].update(window=200, min_window=20, log_text=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qam", "p"], root)
    with flywheel_logs_to_prefect():
        first = pipeline(params_path=root / "params.yaml")
        registry = ModelRegistry.of(load_config(root / "params.yaml"))
        with served(root / "params.yaml", free_port(), "t0ken", registry.uri) as url:
            predicted = httpx.post(f"{url}/predict", json={"text": PII_TEXT})
            assert predicted.status_code == 200, predicted.text
            sent = httpx.post(
                f"{url}/feedback",
                json={"text": PII_TEXT, "label": "rotten", "id": "pii"},
                headers={"Authorization": "Bearer t0ken"},
            )
            assert sent.status_code == 201, sent.text
        report = feedback_demo(root / "params.yaml", limit=SNIPPETS)
    return root, first, report


def test_feedback_fires_a_retrain_whose_data_holds_the_feedback(looped):
    root, first, report = looped
    sent = report["feedback_rows"]
    assert sent + report["held_back_rows"] == SNIPPETS and 40 <= sent <= 120
    assert report["feedback_new"] == sent
    assert report["retrain_fired"]
    assert any(
        r.startswith(f"feedback count: {sent + 1} new rows") for r in report["retrain_reasons"]
    )
    registry = ModelRegistry.of(load_config(root / "params.yaml"))
    assert report["old_champion"] == first.registered.version == "1"
    assert report["candidate"] == "2"
    tags = registry.version("2").tags
    assert tags[FEEDBACK_SEQ_TAG] == str(sent + 1)  # the new data holds all feedback so far
    assert tags["flywheel.data_version"] != first.data_version
    prepared = pd.concat(
        pd.read_parquet(root / "data" / "prepared" / f"{split}.parquet")
        for split in ("train", "val", "test")
    )
    from_feedback = prepared[prepared["source"] == "feedback"]
    assert 0 < len(from_feedback) <= sent + 1  # cleaning may drop a duplicate
    masked = from_feedback[from_feedback["text"].str.contains("the film was dull")]
    assert masked["text"].tolist() == [MASKED_PII_TEXT]
    from_source = prepared[prepared["text"].str.startswith("Case ")]
    assert len(from_source) == len(SOURCE_PII)
    assert from_source["text"].str.contains("card <CARD> and IBAN <IBAN>").all()
    # the held-back half, the one both champions are scored on, is not training data
    cfg = load_config(root / "params.yaml")
    pii = cfg.clean.mask_pii
    held_back = split_halves(snippets(cfg), cfg.seed, SNIPPETS, pii=pii).held_back
    assert len(held_back) == report["held_back_rows"]
    keys = set(held_back["text"].map(lambda t: snippet_key(t, pii)))
    assert keys.isdisjoint(prepared["text"].map(snippet_key))  # prepared text is masked already


def test_personal_data_in_sources_and_requests_is_nowhere_but_the_users_own_file(looped):
    """Seeded in a source file, a prediction and a feedback row: none of it in data/ (but the
    user's own source file), the DVC cache and remote, MLflow (store and artifacts), the
    server's log and prediction log, the feedback store, the reports, Prefect logs and
    artifacts."""
    root, _, _ = looped
    data = [p for p in (root / "data").iterdir() if p.name != "sources"]
    assert {"raw", "prepared", "monitoring", "feedback"} <= {p.name for p in data}
    logged = root / "data" / "monitoring" / "predictions.db"
    assert logged.is_file() and (root / "reports" / "demo" / "serve.log").is_file()
    stores = [root / ".dvc" / "cache", root.parent / "remote", root / "mlflow"]
    assert all(p.exists() for p in stores)
    assert leaks([*data, *stores, root / "reports", root / ".flywheel"]) == {}
    assert set(leaks([root / "data" / "sources"])) == set(SEEDS)  # the scan finds what is there
    records = "\n".join(prefect_records())
    assert "Beginning flow run" in records and "for flow 'flywheel-retrain'" in records
    # flywheel's own log lines reached the server (as with `flywheel run`), what was masked too
    assert "collect: PII masked before writing: email 8, iban 8, card 8, phone 8" in records
    # the run summary artifacts reached the server: each of the 8 source rows masked once
    assert "| PII masked | url 0, email 8, iban 8, card 8, ip 0, phone 8 |" in records
    blob = records.encode()
    assert [kind for kind, seed in SEEDS.items() if any(f in blob for f in seed_forms(seed))] == []


def test_both_accuracies_are_reported_and_the_server_followed_the_champion(looped):
    root, _, report = looped
    assert 0 <= report["old_accuracy"] <= 1 and 0 <= report["new_accuracy"] <= 1
    registry = ModelRegistry.of(load_config(root / "params.yaml"))
    assert report["new_champion"] == registry.alias(CHAMPION)
    assert report["promoted"] == (report["new_champion"] == "2")
    saved = json.loads((root / "reports" / "demo" / "feedback.json").read_text())
    assert saved["old_accuracy"] == report["old_accuracy"]
    text = (root / "reports" / "demo" / "feedback.md").read_text()
    assert f"{report['old_accuracy']:.4f}" in text and f"{report['new_accuracy']:.4f}" in text


def test_a_second_check_right_after_does_not_fire_and_each_check_is_an_artifact(looped):
    root, _, report = looped
    finished = last_firing(root)
    assert finished.outcome == ("promoted" if report["promoted"] else "not promoted")
    assert finished.finished_at is not None
    state = retrain(params_path=root / "params.yaml", if_needed=True, return_state=True)
    result = state.result()
    assert not result.decision.fire and result.pipeline is None
    count = next(c for c in result.decision.checks if c.name == "feedback count")
    if report["promoted"]:  # the new champion's data holds every feedback row
        assert count.value == "0 new rows" and not count.crossed
    else:  # the old champion still has all of it against it, but it was just judged
        assert count.crossed
    if any(c.crossed for c in result.decision.checks):  # e.g. Amazon traffic drifts
        assert result.decision.blocked.startswith("cool-down: the last retrain ended")
    else:
        assert result.decision.headline() == "not fired: every bound holds"
    artifacts = flow_run_artifacts(state.state_details.flow_run_id)
    assert DECISION_ARTIFACT in artifacts and OUTCOME_ARTIFACT not in artifacts
    assert "not fired" in artifacts[DECISION_ARTIFACT].data


def test_a_retrain_while_another_holds_the_slot_does_not_fire(looped):
    root, _, _ = looped
    before = last_firing(root)
    with retrain_slot(root) as held:  # as a running retrain would
        assert held
        result = retrain(params_path=root / "params.yaml", if_needed=False)  # even forced
    assert not result.decision.fire and result.pipeline is None
    assert result.decision.blocked == "another retrain is running (it holds the retrain slot)"
    assert last_firing(root) == before


def test_a_failed_retrain_is_recorded_so_the_next_check_tries_again(looped, monkeypatch):
    root, _, _ = looped

    def broken_pipeline(**_):
        raise RuntimeError("disk full")

    monkeypatch.setattr(retrain_flow, "pipeline", broken_pipeline)
    with pytest.raises(RuntimeError, match="disk full"):
        retrain(params_path=root / "params.yaml", if_needed=False)
    failed = last_firing(root)
    assert failed.outcome == "failed" and failed.finished_at is not None
    # the next check, once the cool-down is over, fires again on the same evidence
    cfg = load_config(root / "params.yaml")
    later = datetime.fromisoformat(failed.finished_at) + timedelta(
        minutes=cfg.retrain.cooldown_minutes + 1
    )
    evidence = gather(cfg)
    assert evidence.fingerprint() == failed.evidence  # nothing new since
    crossing = replace(evidence, new_feedback=cfg.retrain.min_feedback)  # same fingerprint
    assert decide(crossing, cfg.retrain, failed, later).fire
    settled = replace(failed, outcome="not promoted")  # had it not failed: the same evidence
    assert decide(crossing, cfg.retrain, settled, later).blocked.startswith("same evidence")


def test_drift_alone_with_no_new_rows_alerts_and_runs_no_pipeline(looped, monkeypatch):
    root, _, _ = looped
    cfg = load_config(root / "params.yaml")
    versions = [v.version for v in ModelRegistry.of(cfg).versions()]

    def drift_without_rows(cfg, force=False, busy=False):  # the real rule on such evidence
        drift = Drift("1", 500, True, 0.9, 0.1, 0.0, 0.0, 0.0, "t0", "t1", [], [], [], {}, 1, 500)
        evidence = replace(gather(cfg), new_feedback=0, usable_feedback=0, drift=drift)
        return decide(evidence, cfg.retrain, None, datetime.now(UTC), force, busy)

    def must_not_run(**_):
        raise AssertionError("the pipeline ran on the champion's own data")

    monkeypatch.setattr(retrain_flow, "check_task", drift_without_rows)
    monkeypatch.setattr(retrain_flow, "pipeline", must_not_run)
    state = retrain(params_path=root / "params.yaml", if_needed=True, return_state=True)
    result = state.result()
    assert result.decision.fire and result.outcome == NO_NEW_DATA and result.pipeline is None
    assert not result.promoted
    assert last_firing(root).outcome == NO_NEW_DATA
    artifacts = flow_run_artifacts(state.state_details.flow_run_id)
    assert "drift without new labelled data: nothing new to train on" in (
        artifacts[DECISION_ARTIFACT].data
    )
    assert [v.version for v in ModelRegistry.of(cfg).versions()] == versions


def test_a_forced_retrain_on_unchanged_data_says_what_it_did(looped):
    root, _, report = looped
    result = retrain(params_path=root / "params.yaml", if_needed=False)
    expected = ALREADY_CHAMPION if report["promoted"] else NOT_PROMOTED
    assert result.outcome == expected and last_firing(root).outcome == expected
    if expected == NOT_PROMOTED:
        assert last_firing(root).reasons == result.pipeline.promotion.reasons != []
