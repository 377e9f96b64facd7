import numpy as np
import pandas as pd

from flywheel.models.bundle import Preprocessing
from flywheel.tasks.baseline import GRID, BaselineModel, train_baseline

PREP = Preprocessing(max_length=64, mask_pii=("email",))


def frame(n: int, offset: int = 0) -> pd.DataFrame:
    good = [f"wonderful moving film {i}" for i in range(offset, offset + n)]
    bad = [f"tedious boring mess {i}" for i in range(offset, offset + n)]
    return pd.DataFrame({"text": good + bad, "label": ["pos"] * n + ["neg"] * n})


def test_baseline_learns_selects_on_val_and_round_trips(tmp_path):
    _, result = train_baseline(frame(40), frame(10, 100), PREP, 42, tmp_path / "baseline.joblib")
    assert {k: result.chosen[k] for k in ("C", "min_df")} in GRID
    assert result.chosen["val_macro_f1"] == 1.0
    model = BaselineModel.load(result.model_path)
    assert model.labels == ["neg", "pos"]
    proba = model.predict_proba(["a wonderful film", "so boring, write me at a@b.example.com"])
    assert proba.shape == (2, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert list(np.array(model.labels)[proba.argmax(axis=1)]) == ["pos", "neg"]
