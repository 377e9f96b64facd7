"""Every answered prediction into the prediction log (flywheel/predictions.py) for drift
monitoring: the text's hash and normalised length, the label, its confidence and the share of
words outside the training vocabulary; the raw text only with monitor.log_text. A failed write
costs the log row (counted in /metrics), never the answer."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import Counter

from flywheel import predictions
from flywheel.serving.champion import ServedModel
from flywheel.serving.schemas import Prediction

log = logging.getLogger(__name__)


class PredictionLogger:
    """The app's prediction log: open from app creation to shutdown."""

    def __init__(self, path: Path, keep: int, with_text: bool, errors: Counter):
        self.log = predictions.PredictionLog(path, keep)
        self.with_text, self.errors = with_text, errors

    def record(
        self,
        model: ServedModel,
        received: Sequence[str],
        scored: Sequence[str],
        answers: Sequence[Prediction],
    ) -> None:
        """Log the answers to the texts as received (hashed) and as scored (maybe cut)."""
        try:
            stamp = predictions.now()
            rows = []
            for raw, text, p in zip(received, scored, answers, strict=True):
                normalised = model.normalise(text)
                rows.append(
                    predictions.LoggedPrediction(
                        p.id,
                        stamp,
                        model.version,
                        predictions.text_hash(raw),
                        len(normalised),
                        p.label,
                        p.probabilities[p.label],
                        model.oov_rate(normalised),
                        raw if self.with_text else None,
                    )
                )
            self.log.write(rows)
        except Exception as exc:
            self.errors.inc(len(answers))
            log.error("could not log %d prediction(s): %s", len(answers), exc)

    def close(self) -> None:
        self.log.close()
