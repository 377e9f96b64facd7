"""Micro-batching of /predict (flywheel/serving/scoring.py), both ways: with serve.batch_wait_ms
> 0 concurrent requests share model calls and each gets the answer to its own texts (the same
as unbatched), a request alone does not wait, a failing text fails only its own request; with
0 every request is its own model call. Either way the model runs off the event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import httpx
import numpy as np
import pytest

from flywheel.models.bundle import Preprocessing
from flywheel.models.predictor import OnnxPredictor, Prediction
from flywheel.serving.app import create_app
from flywheel.serving.champion import ChampionSlot, ServedModel
from flywheel.serving.errors import ApiError
from flywheel.serving.scoring import ARRIVING, Scorer
from tests.serving.conftest import LABELS
from tests.serving.test_api import settings

TEXTS = [
    "A wonderful, moving film.",
    "Dull and far too long.",
    "great acting",
    "An awful plot, and worse dialogue.",
    "fine",
    "Not bad at all",
    "The best film of the year, by far",
    "boring",
]


class CountingModel:
    """A stand-in predictor: the label from the text, counted calls, optional failure and
    blocking (to hold a model call while the test looks at the server)."""

    labels = LABELS
    preprocessing = Preprocessing(32, ())

    def __init__(self, fail_on: str | None = None):
        self.calls: list[list[str]] = []
        self.fail_on = fail_on
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        self.entered.set()
        self.release.wait(10)
        self.calls.append(list(texts))
        if self.fail_on is not None and any(self.fail_on in t for t in texts):
            raise RuntimeError(f"cannot score {self.fail_on!r}")
        return [
            Prediction(label, {label: 0.9, other: 0.1})
            for label, other in (
                ("fresh", "rotten") if len(t) % 2 else ("rotten", "fresh") for t in texts
            )
        ]


class ModelSource:
    def __init__(self, predictor):
        self.predictor = predictor

    def champion(self) -> str:
        return "1"

    def load(self, version: str) -> ServedModel:
        return ServedModel(version, self.predictor, None, {})


def loaded(predictor) -> ChampionSlot:
    slot = ChampionSlot(ModelSource(predictor))
    slot.reload()
    return slot


@pytest.fixture
def counting() -> CountingModel:
    return CountingModel()


def arriving() -> dict:
    """The scope of a request that the arrivals middleware has counted."""
    return {ARRIVING: True}


async def concurrently(scorer: Scorer, groups: Sequence[Sequence[str]]):
    """`groups` as concurrent requests, all counted as arriving first (as the middleware does
    when their headers are in)."""
    scorer.arrivals.count += len(groups)
    return await asyncio.gather(*(scorer.score(g, arriving()) for g in groups))


def without_probe(model: CountingModel) -> list[list[str]]:
    return model.calls[1:]  # the first call is the reload's probe text


@pytest.mark.parametrize("wait_ms", [50.0, 0.0], ids=["batching", "off"])
def test_concurrent_requests_share_calls_only_when_batching(counting, wait_ms):
    scorer = Scorer(loaded(counting), wait_ms, max_texts=64)

    async def go():
        try:
            return await concurrently(scorer, [[t] for t in TEXTS])
        finally:
            await scorer.close()

    answers = asyncio.run(go())
    calls = without_probe(counting)
    if wait_ms:
        assert calls == [TEXTS]  # one model call for all eight
    else:
        assert sorted(calls) == sorted([t] for t in TEXTS)  # one call per request
    assert scorer.calls == len(calls)
    for text, (model, got) in zip(TEXTS, answers, strict=True):
        assert model.version == "1"
        assert got == CountingModel().predict([text])  # its own text's answer


def test_batches_hold_at_most_max_batch_texts(counting):
    scorer = Scorer(loaded(counting), 50.0, max_texts=3)

    async def go():
        try:
            return await concurrently(scorer, [[t] for t in TEXTS[:7]] + [TEXTS[:3]])
        finally:
            await scorer.close()

    answers = asyncio.run(go())
    calls = without_probe(counting)
    assert [len(c) for c in calls] == [3, 3, 1, 3]  # whole requests, never split
    assert [t for c in calls for t in c] == TEXTS[:7] + TEXTS[:3]  # in arrival order
    assert answers[-1][1] == CountingModel().predict(TEXTS[:3])


def test_batched_answers_are_the_unbatched_answers_of_a_real_model(exports):
    """fp32 models: equal up to float error (an int8 model's answers move a little with the
    texts they share a call with; docs/serving.md)."""
    predictor = OnnxPredictor(exports["1"])
    scorer = Scorer(loaded(predictor), 50.0, max_texts=64)
    groups = [[t] for t in TEXTS] + [TEXTS[:3]]

    async def go():
        try:
            return await concurrently(scorer, groups)
        finally:
            await scorer.close()

    answers = asyncio.run(go())
    assert scorer.calls == 1
    for group, (_, got) in zip(groups, answers, strict=True):
        alone = predictor.predict_proba(group)
        np.testing.assert_allclose(
            [[p.probabilities[label] for label in LABELS] for p in got], alone, atol=1e-5
        )
        assert [p.label for p in got] == [LABELS[i] for i in alone.argmax(axis=1)]


def test_a_request_alone_does_not_wait_and_waiting_is_bounded(counting):
    scorer = Scorer(loaded(counting), 400.0, max_texts=64)

    async def go():
        scorer.arrivals.count = 1  # only itself, counted by the middleware
        started = time.perf_counter()
        await scorer.score(["alone"], arriving())
        alone = time.perf_counter() - started
        # another request is on its way in and never comes: wait, but not past the deadline
        scorer.arrivals.count = 2
        started = time.perf_counter()
        await scorer.score(["first"], arriving())
        waited = time.perf_counter() - started
        # the one on its way comes 50 ms later: both in one model call, before the deadline
        scorer.arrivals.count = 2
        calls = scorer.calls
        started = time.perf_counter()

        async def late():
            await asyncio.sleep(0.05)
            return await scorer.score(["second"], arriving())

        await asyncio.gather(scorer.score(["first"], arriving()), late())
        together = time.perf_counter() - started
        await scorer.close()
        return alone, waited, together, scorer.calls - calls

    alone, waited, together, calls = asyncio.run(go())
    assert alone < 0.2  # far below the 400 ms wait
    assert 0.35 < waited < 2.0
    assert calls == 1 and 0.04 < together < 0.35
    assert without_probe(counting)[-1] == ["first", "second"]


@pytest.mark.parametrize("wait_ms", [50.0, 0.0], ids=["batching", "off"])
def test_a_failing_text_fails_only_its_own_request(wait_ms):
    model = CountingModel(fail_on="boom")
    scorer = Scorer(loaded(model), wait_ms, max_texts=64)
    groups = [["fine"], ["boom here"], ["also fine", "and this"]]

    async def go():
        try:
            scorer.arrivals.count += len(groups)
            results = await asyncio.gather(
                *(scorer.score(g, arriving()) for g in groups), return_exceptions=True
            )
            after = await scorer.score(["later"])  # the scorer goes on
            return results, after
        finally:
            await scorer.close()

    results, after = asyncio.run(go())
    assert isinstance(results[1], RuntimeError) and "boom" in str(results[1])
    assert results[0][1] == CountingModel().predict(["fine"])
    assert results[2][1] == CountingModel().predict(["also fine", "and this"])
    assert after[1] == CountingModel().predict(["later"])


async def post_all(app, payloads: Sequence[dict], extra: str | None = None):
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        sent = [client.post("/predict", json=p) for p in payloads]
        if extra:
            sent.append(client.get(extra))
        return await asyncio.gather(*sent)


@pytest.mark.parametrize("wait_ms", [300.0, 0.0], ids=["batching", "off"])
def test_over_http_each_request_gets_its_answer_and_a_failure_stays_its_own(tmp_path, wait_ms):
    model = CountingModel(fail_on="boom")
    app = create_app(settings(tmp_path, batch_wait_ms=wait_ms, max_batch=8), loaded(model))
    payloads = [{"text": t} for t in TEXTS[:3]] + [{"text": "boom"}, {"texts": TEXTS[3:5]}]
    responses = asyncio.run(post_all(app, payloads))
    statuses = [r.status_code for r in responses]
    assert statuses == [200, 200, 200, 500, 200]
    failed = responses[3].json()
    assert failed == {"detail": "internal error (RuntimeError); see the server log", "errors": []}
    for payload, response in zip(payloads, responses, strict=True):
        if response.status_code != 200:
            continue
        texts = [payload["text"]] if "text" in payload else payload["texts"]
        got = [p["label"] for p in response.json()["predictions"]]
        assert got == [p.label for p in CountingModel().predict(texts)]
    state = app.state.flywheel
    # batched: the failed call, then each request alone; unbatched: a call per request
    calls = 1 + len(payloads) if wait_ms else len(payloads)
    assert state.scorer.calls == calls
    metrics = state.metrics.render().decode()  # texts per model call, in /metrics
    assert f"flywheel_model_call_texts_count {calls:.1f}" in metrics
    assert f"flywheel_model_call_texts_sum {6 * 2 if wait_ms else 6:.1f}" in metrics
    state.predictions.close()


@pytest.mark.parametrize("wait_ms", [50.0, 0.0], ids=["batching", "off"])
def test_the_event_loop_answers_health_while_the_model_scores(tmp_path, counting, wait_ms):
    app = create_app(settings(tmp_path, batch_wait_ms=wait_ms), loaded(counting))
    counting.release.clear()  # the next model call blocks until released
    counting.entered.clear()

    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            scoring = asyncio.create_task(client.post("/predict", json={"text": "slow"}))
            while not counting.entered.is_set():
                await asyncio.sleep(0.005)
            health = await asyncio.wait_for(client.get("/health"), 5)
            still_scoring = not scoring.done()
            counting.release.set()
            return health, still_scoring, await scoring

    health, still_scoring, scored = asyncio.run(go())
    assert health.status_code == 200 and still_scoring
    assert scored.status_code == 200
    app.state.flywheel.predictions.close()


def test_one_scorer_serves_one_event_loop_after_another(counting):
    """A test client, or a restarted app, may run the app on a new event loop."""
    scorer = Scorer(loaded(counting), 50.0, max_texts=64)
    for _ in range(2):
        _, answers = asyncio.run(asyncio.wait_for(scorer.score(["again"]), 5))
        assert answers == CountingModel().predict(["again"])
    asyncio.run(scorer.close())


def test_closing_answers_what_is_still_queued_with_a_503(counting):
    scorer = Scorer(loaded(counting), 1000.0, max_texts=64)

    async def go():
        scorer.arrivals.count = 2  # one more on its way: the queued request waits for it
        queued = asyncio.create_task(scorer.score(["queued"], arriving()))
        await asyncio.sleep(0.05)
        await scorer.close()
        with pytest.raises(ApiError) as refused:
            await queued
        return refused.value

    refused = asyncio.run(go())
    assert refused.status == 503 and "shutting down" in refused.detail
    assert without_probe(counting) == []


def test_batch_wait_is_configured_and_checked(tmp_path):
    from flywheel.errors import FlywheelError

    assert settings(tmp_path).serve.batch_wait_ms >= 0
    assert settings(tmp_path, batch_wait_ms=0).serve.batch_wait_ms == 0
    with pytest.raises(FlywheelError, match="batch_wait_ms"):
        settings(tmp_path, batch_wait_ms=-1)


def test_the_served_answers_match_with_and_without_batching(tmp_path, exports):
    """Through the whole app on a real model: the same texts, batched or not, same answers."""
    payloads = [{"text": t} for t in TEXTS]
    answers = {}
    for wait_ms in (0.0, 300.0):
        app = create_app(
            settings(tmp_path / str(wait_ms), batch_wait_ms=wait_ms),
            loaded(OnnxPredictor(exports["1"])),
        )
        responses = asyncio.run(post_all(app, payloads))
        answers[wait_ms] = np.array(
            [[r.json()["predictions"][0]["probabilities"][x] for x in LABELS] for r in responses]
        )
        app.state.flywheel.predictions.close()
    np.testing.assert_allclose(answers[300.0], answers[0.0], atol=1e-5)


def test_spinning_threads_are_a_session_setting_that_leaves_the_answers_as_they_are(exports):
    """serve.spin_threads false: onnxruntime's threads sleep between calls (a session config
    entry); on (its default) no entry is set. The answers are the same either way."""
    spinning = OnnxPredictor(exports["1"], threads=2)
    sleeping = OnnxPredictor(exports["1"], threads=2, spinning=False)
    entry = "session.intra_op.allow_spinning"
    assert sleeping.session.get_session_options().get_session_config_entry(entry) == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        spinning.session.get_session_options().get_session_config_entry(entry)
    np.testing.assert_array_equal(spinning.logits(TEXTS), sleeping.logits(TEXTS))
