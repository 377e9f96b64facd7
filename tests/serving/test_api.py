"""The HTTP API in-process (FastAPI's TestClient) on real exported models: every endpoint, every
kind of bad request, the token, reload, the prediction log and the feedback store."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from fastapi.testclient import TestClient

from flywheel import feedback, predictions
from flywheel.config import load_config
from flywheel.models.predictor import OnnxPredictor
from flywheel.serving.app import create_app
from flywheel.serving.champion import ChampionSlot
from tests.conftest import REPO
from tests.serving.conftest import LABELS, FolderSource

TEXTS = ["A wonderful, moving film.", "Dull and far too long.", "Write me at jane@example.com"]


def settings(tmp_path, **serve):
    overrides = {
        "data.feedback.path": str(tmp_path / "feedback.db"),
        "monitor.predictions_path": str(tmp_path / "predictions.db"),
        "serve.max_batch": 3,
        "serve.max_text_chars": 50,
    } | {f"serve.{k}": v for k, v in serve.items()}
    return load_config(REPO / "params.yaml", overrides)


@pytest.fixture
def source(exports):
    return FolderSource(exports)


def client_for(cfg, source, token=None) -> TestClient:
    slot = ChampionSlot(source)
    slot.reload()
    return TestClient(create_app(cfg, slot, token))


@pytest.fixture
def api(tmp_path, source):
    with client_for(settings(tmp_path), source) as client:
        yield client


def test_predict_one_and_a_batch_logs_each_answer(api, tmp_path, exports):
    one = api.post("/predict", json={"text": TEXTS[0]})
    assert one.status_code == 200
    body = one.json()
    assert body["model_version"] == "1" and len(body["predictions"]) == 1
    batch = api.post("/predict", json={"texts": TEXTS}).json()["predictions"]
    expected = OnnxPredictor(exports["1"]).predict_proba(TEXTS)
    got = np.array([[p["probabilities"][label] for label in LABELS] for p in batch])
    np.testing.assert_allclose(got, expected, atol=1e-5)  # order kept, same model
    assert [p["label"] for p in batch] == [LABELS[i] for i in expected.argmax(axis=1)]
    assert not any(p["truncated"] for p in batch)

    assert api.app.state.flywheel.predictions.flush()  # written off the request path
    logged = predictions.read(tmp_path / "predictions.db")
    assert logged["id"].tolist() == [body["predictions"][0]["id"]] + [p["id"] for p in batch]
    assert logged["model_version"].unique().tolist() == ["1"]
    assert logged["text_sha256"].iloc[1] == predictions.text_hash(TEXTS[0])
    assert logged["text"].isna().all()  # no raw text unless monitor.log_text
    assert logged["length"].iloc[3] == len("Write me at <EMAIL>")  # what the model saw
    assert logged["confidence"].iloc[1] == pytest.approx(expected[0].max(), abs=1e-5)
    assert logged["oov_rate"].min() >= 0 and logged["oov_rate"].max() <= 1


BAD_PREDICTS = {
    "empty text": ({"text": ""}, 422, "text is empty or only whitespace"),
    "whitespace text": ({"text": " \n\t"}, 422, "text is empty or only whitespace"),
    "blank in a batch": ({"texts": ["fine", "  "]}, 422, "texts[1] is empty"),
    "number as text": ({"text": 5}, 422, "text: Input should be a valid string"),
    "number in a batch": ({"texts": ["a", 3]}, 422, "texts[1]: Input should be a valid string"),
    "list as text": ({"text": ["a"]}, 422, "text: Input should be a valid string"),
    "batch over the limit": ({"texts": ["a"] * 4}, 413, "over the limit of 3 (serve.max_batch)"),
    "text over the limit": ({"text": "x" * 51}, 413, "51 characters, over the limit of 50"),
    "neither field": ({}, 422, "send either `text`"),
    "both fields": ({"text": "a", "texts": ["b"]}, 422, "send either `text`"),
    "empty batch": ({"texts": []}, 422, "`texts` is empty"),
    "unknown field": ({"text": "a", "lang": "en"}, 422, "lang: Extra inputs are not permitted"),
    "a JSON list": (["a"], 422, "body: Input should be a valid dictionary"),
}


@pytest.mark.parametrize("case", BAD_PREDICTS, ids=list(BAD_PREDICTS))
def test_bad_predict_requests_say_what_is_wrong(api, case):
    payload, status, message = BAD_PREDICTS[case]
    response = api.post("/predict", json=payload)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_malformed_json_no_body_and_a_wrong_content_type(api):
    json_type = {"content-type": "application/json"}
    bad = api.post("/predict", content=b'{"text": "a",}', headers=json_type)
    assert bad.status_code == 400 and "malformed JSON at character" in bad.json()["detail"]
    null = api.post("/predict", content=b"null", headers=json_type)
    assert null.status_code == 422 and null.json()["detail"] == "body: Field required"
    nothing = api.post("/predict")
    assert nothing.status_code == 415 and "send a JSON body" in nothing.json()["detail"]
    form = api.post("/predict", content=b"text=hello", headers={"content-type": "text/plain"})
    assert form.status_code == 415 and "Content-Type: application/json" in form.json()["detail"]
    assert api.get("/health").status_code == 200  # still up after all of it


def test_long_texts_are_cut_and_flagged_when_configured(tmp_path, source, exports):
    with client_for(settings(tmp_path, long_text="truncate"), source) as api:
        long_text = "A wonderful film. " * 10
        answer = api.post("/predict", json={"texts": [long_text, "short"]}).json()
    cut, short = answer["predictions"]
    assert cut["truncated"] and not short["truncated"]
    expected = OnnxPredictor(exports["1"]).predict_proba([long_text[:50]])[0]
    assert cut["probabilities"]["fresh"] == pytest.approx(expected[0], abs=1e-5)


def test_feedback_is_stored_once_per_id_and_takes_the_logged_prediction(api, tmp_path):
    answer = api.post("/predict", json={"text": TEXTS[1]}).json()
    prediction = answer["predictions"][0]
    payload = {
        "id": "ticket-1",
        "text": TEXTS[1],
        "label": "rotten",
        "prediction_id": prediction["id"],
    }
    first = api.post("/feedback", json=payload)
    assert first.status_code == 201
    assert first.json() == {"id": "ticket-1", "created": True, "model_version": "1", "masked": {}}
    again = api.post("/feedback", json=payload)
    assert again.status_code == 200 and again.json()["created"] is False
    stored = feedback.read(tmp_path / "feedback.db")
    assert len(stored) == 1
    row = stored.iloc[0]
    assert (row["label"], row["predicted_label"], row["model_version"]) == (
        "rotten",
        prediction["label"],
        "1",
    )
    assert row["prediction_id"] == prediction["id"] and row["source"] == "api"
    without_id = api.post("/feedback", json={"text": "fine film", "label": "fresh"})
    assert without_id.status_code == 201 and len(without_id.json()["id"]) == 32


def test_feedback_without_id_is_stored_once_per_text_and_label(api, tmp_path):
    first = api.post("/feedback", json={"text": "Dull and far too long.", "label": "rotten"})
    assert first.status_code == 201 and first.json()["created"] is True
    # the same text (up to case, spacing and punctuation) and label: a repeat, stored once
    again = api.post("/feedback", json={"text": "dull and  far too long", "label": "rotten"})
    assert again.status_code == 200 and again.json() == first.json() | {"created": False}
    # another label is kept: a conflict the clean stage resolves
    other = api.post("/feedback", json={"text": "Dull and far too long.", "label": "fresh"})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    # a client id stays the client's, even for a text already stored
    own = api.post(
        "/feedback", json={"id": "t-9", "text": "Dull and far too long.", "label": "rotten"}
    )
    assert own.status_code == 201 and own.json()["id"] == "t-9"
    stored = feedback.read(tmp_path / "feedback.db")
    assert stored["label"].tolist() == ["rotten", "fresh", "rotten"]


BAD_FEEDBACK = {
    "unknown label": ({"text": "a", "label": "meh"}, 422, "label: unknown label 'meh'"),
    "unknown predicted label": (
        {"text": "a", "label": "fresh", "predicted_label": "pos"},
        422,
        "predicted_label: unknown label 'pos' (labels: fresh, rotten)",
    ),
    "blank text": ({"text": "  ", "label": "fresh"}, 422, "text is empty"),
    "markup only": ({"text": "<p><br></p>", "label": "fresh"}, 422, "empty after cleaning"),
    "number as label": ({"text": "a", "label": 1}, 422, "label: Input should be a valid string"),
    "missing label": ({"text": "a"}, 422, "label: Field required"),
    "bad id": ({"id": "a b", "text": "a", "label": "fresh"}, 422, "id: String should match"),
    "text over the limit": ({"text": "x" * 51, "label": "fresh"}, 413, "over the limit of 50"),
}


@pytest.mark.parametrize("case", BAD_FEEDBACK, ids=list(BAD_FEEDBACK))
def test_bad_feedback_is_refused_and_nothing_is_stored(api, tmp_path, case):
    payload, status, message = BAD_FEEDBACK[case]
    response = api.post("/feedback", json=payload)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert feedback.read(tmp_path / "feedback.db").empty


def test_the_token_guards_feedback_and_reload_only(tmp_path, source):
    with client_for(settings(tmp_path), source, token="s3cret") as api:
        payload = {"text": "fine", "label": "fresh"}
        missing = api.post("/feedback", json=payload)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer <token>" in missing.json()["detail"]
        wrong = api.post("/feedback", json=payload, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["detail"] == "wrong bearer token"
        assert api.post("/reload").status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert api.post("/feedback", json=payload, headers=good).status_code == 201
        assert api.post("/reload", headers=good).status_code == 200
        assert api.post("/predict", json={"text": "open to all"}).status_code == 200
    assert len(feedback.read(tmp_path / "feedback.db")) == 1


def test_health_model_and_reload(api, source):
    assert api.get("/health").json() == {"status": "ok", "model_version": "1"}
    info = api.get("/model").json()
    assert info["version"] == "1" and info["labels"] == LABELS
    assert info["data_version"] == "data-1" and info["metrics"] == {"accuracy": 0.5}
    assert info["loaded_at"]

    assert api.post("/reload").json() == {"previous": "1", "current": "1", "changed": False}
    assert source.loads == 1  # nothing moved: nothing loaded
    source.champion_version = "2"  # the alias moves
    assert api.post("/reload").json() == {"previous": "1", "current": "2", "changed": True}
    assert api.post("/predict", json={"text": "a"}).json()["model_version"] == "2"
    source.champion_version = "9"  # a version that cannot load
    failed = api.post("/reload")
    assert failed.status_code == 503 and "still serving version 2" in failed.json()["detail"]
    assert api.get("/model").json()["version"] == "2"
    source.champion_version = "1"  # a rollback is a move like any other
    assert api.post("/reload").json()["current"] == "1"


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_metrics_count_requests_latency_labels_feedback_and_reloads(api, source):
    api.post("/predict", json={"texts": TEXTS})
    api.post("/predict", json={"text": ""})
    api.post("/feedback", json={"text": "a", "label": "fresh", "id": "x"})
    api.post("/feedback", json={"text": "a", "label": "fresh", "id": "x"})
    source.champion_version = "2"
    api.post("/reload")
    response = api.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert (
        metric(text, 'flywheel_requests_total{endpoint="/predict",method="POST",status="200"}') == 1
    )
    assert (
        metric(text, 'flywheel_requests_total{endpoint="/predict",method="POST",status="422"}') == 1
    )
    assert metric(text, 'flywheel_request_duration_seconds_count{endpoint="/predict"}') == 2
    assert metric(text, "flywheel_predictions_total{") == 3
    assert metric(text, 'flywheel_feedback_total{result="created"}') == 1
    assert metric(text, 'flywheel_feedback_total{result="duplicate"}') == 1
    assert metric(text, 'flywheel_model_reloads_total{result="swapped"}') == 1
    assert metric(text, "flywheel_model_version ") == 2


def test_a_failing_prediction_log_costs_the_log_row_not_the_answer(api, monkeypatch):
    def broken(self, rows):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(predictions.PredictionLog, "write", broken)
    assert api.post("/predict", json={"texts": TEXTS[:2]}).status_code == 200
    assert api.app.state.flywheel.predictions.flush()
    assert metric(api.get("/metrics").text, "flywheel_prediction_log_errors_total") == 2


def test_openapi_documents_every_endpoint_with_examples(api):
    spec = api.get("/openapi.json").json()
    assert {"/predict", "/feedback", "/reload", "/health", "/model", "/metrics"} <= set(
        spec["paths"]
    )
    examples = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert set(examples["examples"]) == {"one", "batch"}
    schemas = spec["components"]["schemas"]
    assert schemas["FeedbackRequest"]["examples"] and schemas["PredictResponse"]["examples"]
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert {"401", "422"} <= set(spec["paths"]["/feedback"]["post"]["responses"])
    assert api.get("/docs").status_code == 200
