"""Personal data sent to the server is masked before it is written: an e-mail address, a phone
number, a card number and an IBAN go through the real /feedback and /predict endpoints, and the
raw bytes of every file the server wrote are searched for them.

`SEEDS`, `PII_TEXT` and `leaks` are meant for reuse: an end-to-end test sends `PII_TEXT`, runs
the pipeline, and points `leaks` at data/, the DVC cache and the MLflow store as well.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from flywheel import feedback, predictions
from flywheel.config import load_config
from tests.conftest import REPO
from tests.serving.conftest import FolderSource
from tests.serving.test_api import client_for, settings

SEEDS = {
    "email": "jane.doe@example.com",
    "phone": "+44 20 7946 0958",
    "card": "4111 1111 1111 1111",  # a Luhn-valid test card number
    "iban": "DE89 3704 0044 0532 0130 00",  # a mod-97-valid example IBAN
}
PII_TEXT = (
    f"Refund to card {SEEDS['card']} or IBAN {SEEDS['iban']} please, call {SEEDS['phone']} "
    f"or write to {SEEDS['email']}; the film was dull"
)
MASKED_PII_TEXT = (
    "Refund to card <CARD> or IBAN <IBAN> please, call <PHONE> or write to <EMAIL>; "
    "the film was dull"
)


def seed_forms(seed: str) -> set[bytes]:
    """The ways a seed could sit in a file: as sent, its digits run together, the e-mail's
    local part; in UTF-8 and UTF-16."""
    forms = {seed, re.sub(r"\D", "", seed) if re.search(r"\d{4}", seed) else seed}
    if "@" in seed:
        forms.add(seed.split("@")[0])
    return {f.encode(codec) for f in forms for codec in ("utf-8", "utf-16-le")}


def leaks(paths: Iterable[Path]) -> dict[str, list[str]]:
    """Which seeds occur in the raw bytes of these files (folders: every file under them)."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    found: dict[str, list[str]] = {}
    for file in (f for f in files if f.is_file()):
        payload = file.read_bytes()
        for kind, seed in SEEDS.items():
            if any(form in payload for form in seed_forms(seed)):
                found.setdefault(kind, []).append(str(file))
    return found


def test_personal_data_sent_as_feedback_never_reaches_the_disk(tmp_path, exports):
    folder = tmp_path / "server"
    folder.mkdir()
    with client_for(settings(folder, max_text_chars=500), FolderSource(exports)) as api:
        answer = api.post("/predict", json={"text": PII_TEXT}).json()["predictions"][0]
        sent = api.post(
            "/feedback",
            json={"text": PII_TEXT, "label": "rotten", "prediction_id": answer["id"]},
        )
        assert sent.status_code == 201, sent.text
        assert sent.json()["masked"] == {"email": 1, "phone": 1, "card": 1, "iban": 1}
        again = api.post("/feedback", json={"text": PII_TEXT, "label": "rotten"})
        assert again.json()["created"] is False  # the masked text and label make the id
    stored = feedback.read(folder / "feedback.db")
    assert stored["text"].tolist() == [MASKED_PII_TEXT]
    assert (folder / "feedback.db").is_file()
    assert leaks([folder]) == {}  # feedback.db, its journal, the prediction log


def test_the_search_finds_personal_data_written_unmasked(tmp_path):
    """The check above can fail: the same text stored as sent is found, in every form."""
    feedback.add(tmp_path / "feedback.db", [feedback.FeedbackRecord(text=PII_TEXT, label="x")])
    assert set(leaks([tmp_path])) == set(SEEDS)
    digits_only = tmp_path / "digits.txt"
    digits_only.write_text("4111111111111111 89370400440532013000 442079460958 jane.doe")
    assert set(leaks([digits_only])) == set(SEEDS)


def test_a_prediction_log_that_keeps_texts_keeps_them_masked(tmp_path, exports):
    cfg = load_config(
        REPO / "params.yaml",
        {
            "monitor.predictions_path": str(tmp_path / "predictions.db"),
            "monitor.log_text": True,
            "data.feedback.path": str(tmp_path / "feedback.db"),
        },
    )
    with client_for(cfg, FolderSource(exports)) as api:
        assert api.post("/predict", json={"text": PII_TEXT}).status_code == 200
        assert api.app.state.flywheel.predictions.flush()
    logged = predictions.read(tmp_path / "predictions.db")
    assert logged["text"].tolist() == [MASKED_PII_TEXT]
    assert logged["text_sha256"].tolist() == [predictions.text_hash(PII_TEXT)]
    assert leaks([tmp_path]) == {}
