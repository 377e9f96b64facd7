"""Oversized request bodies are refused before the server reads them whole (issue 18,
point 3): by their Content-Length before any byte is read, or as a chunked body passes the
limit; bodies under it go through to the usual checks."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from flywheel.serving.app import create_app
from flywheel.serving.champion import ChampionSlot
from flywheel.serving.limits import BodyLimit, max_body_bytes
from tests.serving.conftest import FolderSource, exports  # noqa: F401 (the fixture)
from tests.serving.test_api import settings


def call(middleware: BodyLimit, headers: list, chunks: list[bytes]) -> tuple[int, dict]:
    """One request through `middleware`: the status sent and what the app saw."""
    seen = {"called": False, "read": 0}
    sent = []
    pending = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive():
        return pending.pop(0)

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):  # reads the whole body, then answers 200
        seen["called"] = True
        more = True
        while more:
            message = await receive()
            seen["read"] += len(message["body"])
            more = message["more_body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware.app = app
    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers}
    asyncio.run(middleware(scope, receive, send))
    return sent[0]["status"], seen


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    status, seen = call(BodyLimit(None, 1000), [(b"content-length", b"5000000")], [b"x" * 10])
    assert status == 413 and not seen["called"]


def test_a_chunked_body_is_refused_at_the_first_chunk_past_the_limit():
    status, seen = call(BodyLimit(None, 1000), [], [b"x" * 600, b"x" * 600, b"x" * 600])
    assert status == 413 and seen["read"] == 600  # the third chunk was never read


def test_a_body_within_the_limit_goes_through():
    status, seen = call(BodyLimit(None, 1000), [(b"content-length", b"900")], [b"x" * 900])
    assert status == 200 and seen["read"] == 900


@pytest.fixture
def api(tmp_path, exports):  # noqa: F811
    slot = ChampionSlot(FolderSource(exports))
    slot.reload()
    cfg = settings(tmp_path)  # max_batch 3, max_text_chars 50
    with TestClient(create_app(cfg, slot)) as client:
        yield client, max_body_bytes(cfg.serve)


def test_the_api_refuses_a_huge_body_and_judges_a_large_valid_one(api):
    client, limit = api
    assert limit == 3 * (50 * 12 + 1024) + 64 * 1024
    huge = client.post(
        "/predict",
        content=json.dumps({"text": "x" * (2 * limit)}),
        headers={"content-type": "application/json"},
    )
    assert huge.status_code == 413
    assert "serve.max_batch" in huge.json()["detail"] and "bytes" in huge.json()["detail"]
    under = client.post("/predict", json={"text": "x" * (limit // 2)})
    assert under.status_code == 413  # read, then refused by the text limit, as before
    assert "serve.max_text_chars" in under.json()["detail"]
    assert client.post("/predict", json={"text": "fine"}).status_code == 200
