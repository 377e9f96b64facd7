"""The served model and its hot swap.

`ChampionSlot.current` is the model answering requests; a request reads it once, so a swap (one
reference assignment, after the new model has loaded and answered a probe text) never changes the
model under a request, and a version that fails to load leaves the old one serving. The slot polls
the `champion` alias (serve.reload_seconds) and reloads on POST /reload.
Why: docs/decisions/0009-serving-feedback-and-retrain-trigger.md.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from flywheel.errors import FlywheelError
from flywheel.models.predictor import OnnxPredictor, Prediction
from flywheel.models.profile import load_vocabulary, oov_rate
from flywheel.registry import CHAMPION, ModelRegistry

log = logging.getLogger(__name__)

PROBE_TEXT = "A probe text to check that the model answers."


@dataclass
class ServedModel:
    """One loaded version: the shared ONNX predictor, its training vocabulary, registry facts."""

    version: str
    predictor: OnnxPredictor
    vocabulary: frozenset[str] | None
    info: dict[str, Any]
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    # A fast tokenizer must not be used by two threads at once ("Already borrowed").
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def labels(self) -> list[str]:
        return self.predictor.labels

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        with self._lock:
            return self.predictor.predict(texts)

    def normalise(self, text: str) -> str:
        return self.predictor.preprocessing.normalise(text)

    def oov_rate(self, normalised: str) -> float | None:
        return None if self.vocabulary is None else oov_rate(normalised, self.vocabulary)


class ModelSource(Protocol):
    """Where the champion comes from (the MLflow registry; tests may use another)."""

    def champion(self) -> str | None: ...

    def load(self, version: str) -> ServedModel: ...


class RegistrySource:
    """The champion alias of one registered model, loaded with `threads` ONNX Runtime threads
    per model call (0: onnxruntime's default, one per core) that spin between calls or not."""

    def __init__(self, registry: ModelRegistry, threads: int = 0, spinning: bool = True):
        self.registry, self.threads, self.spinning = registry, threads, spinning

    def champion(self) -> str | None:
        return self.registry.alias(CHAMPION)

    def load(self, version: str) -> ServedModel:
        info = self.registry.version(version)
        with tempfile.TemporaryDirectory(prefix="flywheel-serve-") as tmp:
            folder = self.registry.download(version, Path(tmp))
            # session and tokenizer are in memory now
            predictor = OnnxPredictor(folder, threads=self.threads, spinning=self.spinning)
            vocabulary = load_vocabulary(folder)
        tags = info.tags
        metrics = {
            key.removeprefix("flywheel.test."): float(value)
            for key, value in tags.items()
            if key.startswith("flywheel.test.") and key != "flywheel.test.rows"
        }
        return ServedModel(
            version,
            predictor,
            vocabulary,
            {
                "name": self.registry.name,
                "data_version": tags.get("flywheel.data_version"),
                "git_commit": tags.get("flywheel.git_commit"),
                "variant": tags.get("flywheel.variant"),
                "metrics": metrics,
                "promoted_at": self.registry.promoted_at(version),
            },
        )


class NoChampionError(FlywheelError):
    """Nothing to serve: no version carries the champion alias."""


@dataclass(frozen=True)
class Reload:
    previous: str | None
    current: str
    changed: bool


class ChampionSlot:
    """The current model, swapped atomically when the champion alias moves."""

    def __init__(self, source: ModelSource, poll_seconds: float = 0.0):
        self.source = source
        self.poll_seconds = poll_seconds
        self.current: ServedModel | None = None
        self._reload_lock = threading.Lock()  # one load at a time; requests never wait on it
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.listeners: list[Callable[[Reload | None], None]] = []  # e.g. metrics

    def reload(self) -> Reload:
        """Load the champion if it is not the version served; swap only a model that answers.
        Listeners hear of every attempt (None: it failed)."""
        try:
            result = self._reload()
        except Exception:
            self._notify(None)
            raise
        self._notify(result)
        return result

    def _reload(self) -> Reload:
        with self._reload_lock:
            previous = self.current.version if self.current else None
            version = self.source.champion()
            if version is None:
                raise NoChampionError(
                    "no version has the champion alias: run `flywheel run` (or `flywheel models "
                    "promote VERSION`) first"
                )
            if version != previous:
                model = self.source.load(version)
                model.predict([PROBE_TEXT])
                self.current = model  # the swap: one assignment
                log.info("serving version %s (was %s)", version, previous or "none")
            return Reload(previous, version, version != previous)

    def _notify(self, result: Reload | None) -> None:
        for listener in self.listeners:
            listener(result)

    def start(self) -> None:
        """Poll the registry every poll_seconds (0: never) in a daemon thread."""
        if self.poll_seconds > 0 and self._poller is None:
            self._stop.clear()
            self._poller = threading.Thread(target=self._poll, name="champion-poll", daemon=True)
            self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=10)
            self._poller = None

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.reload()
            except Exception as exc:  # keep serving the old model; try again next time
                log.error("champion reload failed, still serving the old model: %s", exc)
