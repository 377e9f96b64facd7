"""The ONNX predictor: raw texts -> labels and probabilities, for every consumer of an exported
model (evaluation of the export, the registry's pyfunc model, serving).

`OnnxPredictor` reads an export folder (model.onnx, the tokenizer, flywheel.json), encodes with
the bundle's `Preprocessing.encode` and pads each batch to its longest text after sorting by
length. More: docs/export.md; why: docs/decisions/0006-model-registry-and-promotion.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flywheel.models.bundle import read_meta, softmax

MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]


class OnnxPredictor:
    """An exported model with its tokenizer and label map, on onnxruntime's CPU provider."""

    def __init__(
        self,
        directory: Path,
        model_file: str | Path = MODEL_FILE,
        threads: int = 0,
        spinning: bool = True,
    ):
        """`threads`: onnxruntime's intra-op threads (0: one per core). `spinning`: its threads
        busy-wait for the next call (onnxruntime's default): fastest for back-to-back calls,
        but they burn a core meant for other work between calls (a server's HTTP handling)."""
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.directory = Path(directory)
        self.model_path = self.directory / model_file
        if not self.model_path.is_file():
            raise FileNotFoundError(f"{self.model_path}: no ONNX model there (run flywheel run)")
        self._labels, self.preprocessing = read_meta(self.directory)
        self.tokenizer = AutoTokenizer.from_pretrained(self.directory)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(self.model_path), options, providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]

    @property
    def labels(self) -> list[str]:
        return list(self._labels)

    def logits(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Raw scores, one row per text in input order, columns in `labels` order."""
        out = np.zeros((len(texts), len(self._labels)), dtype=np.float32)
        for members, feed in self.batches(texts, batch_size):
            out[members] = self.session.run(None, feed)[0]
        return out

    def batches(
        self, texts: Sequence[str], batch_size: int = 64
    ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """The model's inputs for `texts`, a batch at a time: texts sorted by token length, each
        batch padded to its longest; with each batch, its texts' positions in `texts`."""
        if not len(texts):
            return
        encoded = self.preprocessing.encode(self.tokenizer, texts)
        order = np.argsort([len(ids) for ids in encoded["input_ids"]], kind="stable")
        for start in range(0, len(order), batch_size):
            members = order[start : start + batch_size]
            yield members, self._feed(encoded, members)

    def _feed(self, encoded: Any, members: np.ndarray) -> dict[str, np.ndarray]:
        features = [{k: encoded[k][i] for k in self.input_names} for i in members]
        padded = self.tokenizer.pad(features, return_tensors="np")
        return {name: padded[name].astype(np.int64) for name in self.input_names}

    def predict_proba(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Class probabilities, one row per text, columns in `labels` order."""
        return softmax(self.logits(texts, batch_size))

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[Prediction]:
        """The most probable label of each text, with every label's probability."""
        proba = self.predict_proba(texts, batch_size)
        return [
            Prediction(
                self._labels[int(row.argmax())],
                {label: float(p) for label, p in zip(self._labels, row, strict=True)},
            )
            for row in proba
        ]
