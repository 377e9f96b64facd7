"""The API under hostile input, hand-written (issue 18, point 3; the generated cases are in
test_api_fuzz.py): deeply nested JSON, wrong content types and encodings, unicode edge cases,
and slow clients holding connections open against the real server. Every refusal is a 4xx whose
detail says what to send instead; nothing is a 5xx; what is valid is answered."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from flywheel import feedback
from tests.reliability.conftest import serving
from tests.reliability.test_body_limit import api  # noqa: F401 (the in-process API fixture)
from tests.serving.conftest import exports, project  # noqa: F401 (fixtures)
from tests.serving.test_api import settings, source  # noqa: F401

JSON = {"content-type": "application/json"}

# name: (path, body bytes, headers, status, phrase in the detail)
CASES = {
    "nested arrays 20,000 deep": (
        "/predict",
        b'{"text": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        JSON,
        400,
        "nesting too deep",
    ),
    "nested objects 3,000 deep": (
        "/predict",
        b'{"a":' * 3_000 + b"1" + b"}" * 3_000,
        JSON,
        400,
        "could not be read as JSON",
    ),
    "a number of 5,000 digits": (
        "/predict",
        b'{"text": 1' + b"0" * 5_000 + b"}",
        JSON,
        400,
        "a number too long",
    ),
    "NaN": ("/predict", b'{"text": NaN}', JSON, 422, "text: Input should be a valid string"),
    "truncated JSON": ("/predict", b'{"text": "good"', JSON, 400, "malformed JSON at character"),
    "text/plain": (
        "/predict",
        b'{"text": "good"}',
        {"content-type": "text/plain"},
        415,
        "send a JSON body with Content-Type: application/json (got text/plain)",
    ),
    "no content type": (
        "/predict",
        b'{"text": "good"}',
        {},
        415,
        "(got no content type)",
    ),
    "a form": (
        "/feedback",
        b"text=good&label=fresh",
        {"content-type": "application/x-www-form-urlencoded"},
        415,
        "(got application/x-www-form-urlencoded)",
    ),
    "multipart": (
        "/predict",
        b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\ngood\r\n--b--\r\n',
        {"content-type": "multipart/form-data; boundary=b"},
        415,
        "(got multipart/form-data)",
    ),
    "Latin-1 bytes": (
        "/predict",
        '{"text": "caf\u00e9"}'.encode("latin-1"),
        {"content-type": "application/json; charset=latin-1"},
        400,
        "send UTF-8 encoded JSON",
    ),
    "a lone surrogate": (
        "/predict",
        b'{"text": "\\ud800 half a pair"}',
        JSON,
        422,
        "text: Value error, holds a lone UTF-16 surrogate (U+D800 at character 0)",
    ),
    "a lone surrogate in a batch": (
        "/predict",
        b'{"texts": ["fine", "\\udfff"]}',
        JSON,
        422,
        "texts[1]: Value error, holds a lone UTF-16 surrogate (U+DFFF",
    ),
    "a lone surrogate as a label": (
        "/feedback",
        b'{"text": "fine", "label": "\\ud800"}',
        JSON,
        422,
        "label: Value error, holds a lone UTF-16 surrogate",
    ),
    "only invisible characters": (
        "/predict",
        json.dumps({"text": "\u200b\u200d\u2060"}).encode(),
        JSON,
        422,
        "text is empty after cleaning (only markup or invisible characters)",
    ),
    "only markup": (
        "/predict",
        json.dumps({"texts": ["fine", "<p><br></p>&nbsp;"]}).encode(),
        JSON,
        422,
        "texts[1] is empty after cleaning",
    ),
    "feedback of only markup": (
        "/feedback",
        json.dumps({"text": "<br>", "label": "fresh"}).encode(),
        JSON,
        422,
        "text is empty after cleaning",
    ),
    "an unknown route": ("/predictions", b"{}", JSON, 404, "Not Found"),
    "a wrong method": ("/health", b"{}", JSON, 405, "Method Not Allowed"),
}

# Valid unicode that must be answered (and stored as feedback), not refused.
UNICODE = {
    "right-to-left with an override": "\u202eالفيلم رائع \u05e1\u05e8\u05d8 great",
    "combining marks": "fine" + "\u0301\u0308" * 20,
    "emoji sequences": "👍🏽 👨‍👩‍👧 🇫🇷 loved it",
    "NUL inside a text": "good\u0000film",
    "a pair escaped in JSON": "\U0001f600 smile",
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_request_is_a_4xx_that_says_what_to_send(api, case):  # noqa: F811
    client, _ = api
    path, body, headers, status, phrase = CASES[case]
    response = client.post(path, content=body, headers=headers)
    assert response.status_code == status, response.text[:300]
    assert phrase in response.json()["detail"], response.text[:300]
    assert set(response.json()) == {"detail", "errors"}


@pytest.mark.parametrize("case", list(UNICODE))
def test_valid_unicode_is_answered_and_stored(api, tmp_path, case):  # noqa: F811
    client, _ = api
    text = UNICODE[case][:50]  # the test settings' serve.max_text_chars
    body = json.dumps({"text": text}).encode()  # ensure_ascii: astral characters as pairs
    predicted = client.post("/predict", content=body, headers=JSON)
    assert predicted.status_code == 200, predicted.text[:300]
    stored = client.post("/feedback", json={"text": text, "label": "fresh"})
    assert stored.status_code == 201, stored.text[:300]
    rows = feedback.read(tmp_path / "feedback.db")
    assert stored.json()["id"] in set(rows["id"])


# --- slow clients against the real server ------------------------------------------------------

SLOW = 40  # connections held open at once: half stop inside their headers, half inside the body


@pytest.fixture
def served(project):  # noqa: F811
    with serving(project, 0) as server:
        yield server.spec, project[0]


def hold(port: int, partial: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(partial)
    return sock


def test_slow_clients_do_not_hold_up_the_others(served):
    spec, root = served
    port = int(spec.url.rsplit(":", 1)[1])
    with httpx.Client(base_url=spec.url, timeout=30) as client:
        before = []
        for i in range(10):
            started = time.perf_counter()
            assert client.post("/predict", json={"text": f"warm up {i}"}).status_code == 200
            before.append(time.perf_counter() - started)
        head = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        body = head + b"Content-Length: 1000\r\n\r\n" + b'{"text": "never fin'
        held = [hold(port, head if i % 2 else body) for i in range(SLOW)]
        try:
            during = []
            for i in range(20):
                started = time.perf_counter()
                answer = client.post("/predict", json={"text": f"while others stall {i}"})
                during.append(time.perf_counter() - started)
                assert answer.status_code == 200, answer.text[:300]
            stored = client.post(
                "/feedback", json={"text": "still taking feedback", "label": "fresh"}
            )
            assert stored.status_code == 201, stored.text[:300]
        finally:
            for sock in held:
                sock.close()
        # The stalled connections cost the others nothing measurable: no answer waited for them.
        assert max(during) < 2.0, during
        assert sorted(during)[10] < 10 * sorted(before)[5] + 0.05, (before, during)
        time.sleep(0.5)
        assert client.get("/health").status_code == 200
    log = (root / "serve.log").read_text()
    assert "Traceback" not in log and " 500 " not in log
