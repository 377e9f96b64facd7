"""Every answered prediction into the prediction log (flywheel/predictions.py) for drift
monitoring: the text's hash and normalised length, the label, its confidence and the share of
words outside the training vocabulary; only with monitor.log_text the text itself, as the model
saw it and with clean.mask_pii's kinds masked too. A failed write costs the log row (counted in
/metrics), never the answer.

Rows are written off the request path: `record` queues the answers (stamped when answered) and
a writer thread ("prediction-log") turns them into rows and writes whatever is queued in one
transaction, so a busy server writes many requests' rows at once. `flush` waits until all that
was recorded before it is written (the feedback intake flushes before it looks a prediction up);
`close` writes the rest.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter

from flywheel import predictions
from flywheel.pii import mask_pii
from flywheel.serving.champion import ServedModel
from flywheel.serving.schemas import Prediction

log = logging.getLogger(__name__)

MOST_PER_WRITE = 512  # recorded requests written in one transaction, at most


@dataclass(frozen=True)
class _Answered:
    stamp: str
    model: ServedModel
    received: Sequence[str]
    scored: Sequence[str]
    answers: Sequence[Prediction]


class PredictionLogger:
    """The app's prediction log: open from app creation to shutdown."""

    def __init__(
        self, path: Path, keep: int, with_text: bool, errors: Counter, mask: Sequence[str] = ()
    ):
        self.log = predictions.PredictionLog(path, keep)
        self.with_text, self.errors = with_text, errors
        self.mask = tuple(mask)  # kinds masked in a logged text, besides the model's own
        self._queue: queue.SimpleQueue[_Answered | threading.Event | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_queued, name="prediction-log")
        self._writer.daemon = True
        self._writer.start()
        self._closed = False

    def record(
        self,
        model: ServedModel,
        received: Sequence[str],
        scored: Sequence[str],
        answers: Sequence[Prediction],
    ) -> None:
        """Log the answers to the texts as received (hashed) and as scored (maybe cut), soon."""
        self._queue.put(_Answered(predictions.now(), model, received, scored, answers))

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until everything recorded so far is written (or failed); False on timeout."""
        if self._closed:
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self) -> None:
        """Write what is queued, stop the writer and close the log."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._writer.join()
        self.log.close()

    def _write_queued(self) -> None:
        stop = False
        while not stop:
            batch: list[_Answered] = []
            waiting: list[threading.Event] = []
            item = self._queue.get()
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    waiting.append(item)
                else:
                    batch.append(item)
                if stop or len(batch) >= MOST_PER_WRITE:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write(batch)
            for event in waiting:
                event.set()

    def _write(self, batch: Sequence[_Answered]) -> None:
        rows: list[predictions.LoggedPrediction] = []
        for answered in batch:
            try:
                rows += self._rows(answered)
            except Exception as exc:
                self._failed(len(answered.answers), exc)
        if not rows:
            return
        try:
            self.log.write(rows)
        except Exception as exc:
            self._failed(len(rows), exc)

    def _failed(self, count: int, exc: Exception) -> None:
        self.errors.inc(count)
        log.error("could not log %d prediction(s): %s", count, exc)

    def _rows(self, a: _Answered) -> list[predictions.LoggedPrediction]:
        rows = []
        for raw, text, p in zip(a.received, a.scored, a.answers, strict=True):
            normalised = a.model.normalise(text)
            rows.append(
                predictions.LoggedPrediction(
                    p.id,
                    a.stamp,
                    a.model.version,
                    predictions.text_hash(raw),
                    len(normalised),
                    p.label,
                    p.probabilities[p.label],
                    a.model.oov_rate(normalised),
                    mask_pii(normalised, self.mask)[0] if self.with_text else None,
                )
            )
        return rows
