"""The model call of /predict, off the event loop, and micro-batching.

`Scorer.score` runs the served model in one worker thread ("flywheel-model"), so the event loop
goes on reading requests and answering /health while a model call runs. With
serve.batch_wait_ms > 0, concurrent requests are grouped: a request joins a queue, and one
dispatcher task takes the queued requests (whole requests, at most serve.max_batch texts) into a
single model call; each request gets the answers to its own texts, from the same model version.

The dispatcher waits for more only while other /predict requests are on their way in (counted
by `Arrivals` from the moment the server has their headers until they reach the queue or are
refused), and for at most batch_wait_ms after the oldest queued request came: a request alone
is scored at once. While the worker is busy, requests queue anyway, so under load batches form
without waiting. A batch whose model call fails is scored again request by request, so a
failure reaches only the request whose texts cause it, by the same path as unbatched.

An int8 model quantizes activations per call, so a text's probabilities move a little with the
texts it shares a call with (measured: docs/serving.md, "Throughput and latency").
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Receive, Scope, Send

from flywheel.models.predictor import Prediction
from flywheel.serving.champion import ChampionSlot, ServedModel
from flywheel.serving.errors import ApiError

ARRIVING = "flywheel.arriving"  # scope key: a /predict request that Arrivals counted
Scored = tuple[ServedModel, list[Prediction]]  # the model that answered, an answer per text


def current_model(slot: ChampionSlot) -> ServedModel:
    """The slot's model now (a request reads it once and keeps it); 503 before one is loaded."""
    model = slot.current
    if model is None:
        raise ApiError(503, "no model loaded yet")
    return model


class Arrivals:
    """/predict requests the server has begun to receive that have not reached the scorer yet
    (their body is being read, parsed or checked)."""

    def __init__(self) -> None:
        self.count = 0

    def reached(self, scope: Scope) -> None:
        """The request is queued, or refused: it is no longer on its way."""
        if scope.pop(ARRIVING, False):
            self.count -= 1


class CountArrivals:
    """ASGI middleware: counts POST /predict requests into `Arrivals` as they come in."""

    def __init__(self, app: ASGIApp, arrivals: Arrivals):
        self.app, self.arrivals = app, arrivals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/predict":
            await self.app(scope, receive, send)
            return
        scope[ARRIVING] = True
        self.arrivals.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.arrivals.reached(scope)


@dataclass
class _Member:
    """One request in the queue."""

    texts: Sequence[str]
    future: asyncio.Future[Scored]
    queued_at: float = field(default_factory=time.perf_counter)

    def settle(self, result: Scored | None = None, error: BaseException | None = None) -> None:
        if self.future.done():  # e.g. its client is gone
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            assert result is not None
            self.future.set_result(result)


class Scorer:
    """Scores texts with the slot's current model in a worker thread; with `wait_ms` > 0,
    concurrent requests share model calls of at most `max_texts` texts. `on_call` is told the
    number of texts of every model call (metrics)."""

    def __init__(
        self,
        slot: ChampionSlot,
        wait_ms: float,
        max_texts: int,
        on_call: Callable[[int], None] | None = None,
    ):
        self.slot, self.wait, self.max_texts = slot, wait_ms / 1000, max_texts
        self.on_call = on_call
        self.arrivals = Arrivals()
        self.calls = 0  # model calls made
        self._executor: ThreadPoolExecutor | None = None
        self._queue: deque[_Member] = deque()
        self._wake: asyncio.Event | None = None
        self._dispatcher: asyncio.Task[None] | None = None

    @property
    def batching(self) -> bool:
        return self.wait > 0

    async def score(self, texts: Sequence[str], scope: Scope | None = None) -> Scored:
        """The model that answered and its answer to each text, in order. `scope`: the request's
        (it has arrived: Arrivals stops counting it)."""
        if scope is not None:
            self.arrivals.reached(scope)
        if not self.batching:
            model = current_model(self.slot)
            return model, await self._call(model, texts)
        member = _Member(texts, asyncio.get_running_loop().create_future())
        self._queue.append(member)
        self._running().set()
        return await member.future

    async def close(self) -> None:
        """Stop the dispatcher (requests still queued get a 503) and the worker thread."""
        if self._dispatcher is not None and not self._dispatcher.done():
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        self._dispatcher = None
        while self._queue:
            self._queue.popleft().settle(error=ApiError(503, "the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def _call(self, model: ServedModel, texts: Sequence[str]) -> list[Prediction]:
        """One model call, in the worker thread."""
        self.calls += 1
        if self.on_call is not None:
            self.on_call(len(texts))
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="flywheel-model")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, model.predict, texts)

    def _running(self) -> asyncio.Event:
        """The dispatcher's wake-up event, with a dispatcher running on this event loop (a test
        client may run the app on one loop after another)."""
        loop = asyncio.get_running_loop()
        task = self._dispatcher
        if task is None or task.done() or task.get_loop() is not loop or self._wake is None:
            self._wake = asyncio.Event()
            self._dispatcher = loop.create_task(self._dispatch(self._wake), name="batcher")
        return self._wake

    async def _dispatch(self, wake: asyncio.Event) -> None:
        while True:
            await wake.wait()
            wake.clear()
            while self._queue:
                await self._gather(wake)
                batch = self._take()
                try:
                    await self._run(batch)
                except asyncio.CancelledError:  # closing: nobody may wait forever
                    for member in batch:
                        member.settle(error=ApiError(503, "the server is shutting down"))
                    raise
                except Exception as exc:  # a bug: this batch fails, the next is scored
                    for member in batch:
                        member.settle(error=exc)

    async def _gather(self, wake: asyncio.Event) -> None:
        """Wait while requests are on their way in and there is room, until the oldest queued
        request has waited batch_wait_ms."""
        deadline = self._queue[0].queued_at + self.wait
        while self.arrivals.count > 0 and self._queued_texts() < self.max_texts:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), left)
            except TimeoutError:
                return

    def _queued_texts(self) -> int:
        return sum(len(m.texts) for m in self._queue)

    def _take(self) -> list[_Member]:
        """The oldest queued requests, whole, up to max_texts texts (at least one request)."""
        batch = [self._queue.popleft()]
        size = len(batch[0].texts)
        while self._queue and size + len(self._queue[0].texts) <= self.max_texts:
            batch.append(self._queue.popleft())
            size += len(batch[-1].texts)
        return batch

    async def _run(self, batch: list[_Member]) -> None:
        batch = [m for m in batch if not m.future.done()]  # a client gone meanwhile
        if not batch:
            return
        try:
            model = current_model(self.slot)
        except ApiError as exc:
            for member in batch:
                member.settle(error=exc)
            return
        try:
            answers = await self._call(model, [t for m in batch for t in m.texts])
        except Exception as exc:
            if len(batch) == 1:
                batch[0].settle(error=exc)
                return
            for member in batch:  # one by one: a failure reaches only its own request
                try:
                    member.settle((model, await self._call(model, member.texts)))
                except Exception as own:
                    member.settle(error=own)
            return
        start = 0
        for member in batch:
            member.settle((model, answers[start : start + len(member.texts)]))
            start += len(member.texts)
