"""Drift statistics against hand-computed values, the report files, and monitor() on a stub
registry (the registry itself is tested in tests/model)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from typer.testing import CliRunner

from flywheel import drift as stage
from flywheel import predictions
from flywheel.cli import app
from flywheel.config import RetrainConfig, load_config
from flywheel.drift import MonitorError, drift, label_shift, psi
from flywheel.models.profile import Histogram, ReferenceProfile
from tests.conftest import REPO

RC = RetrainConfig()  # max_psi 0.25, max_label_shift 0.2, max_oov_drift 0.1


def test_psi_by_hand():
    # (0.9 - 0.5) ln(0.9 / 0.5) + (0.1 - 0.5) ln(0.1 / 0.5) = 0.4 ln 1.8 + 0.4 ln 5
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.4 * math.log(1.8) + 0.4 * math.log(5))
    assert psi([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == 0
    # an empty bin is floored at 1e-4: 0.5 ln 2 + (1e-4 - 0.5) ln(1e-4 / 0.5)
    expected = 0.5 * math.log(2) + (1e-4 - 0.5) * math.log(1e-4 / 0.5)
    assert psi([0.5, 0.5], [1.0, 0.0]) == pytest.approx(expected)


def test_label_shift_is_total_variation():
    # 1/2 (|0.3 - 0.6| + |0.5 - 0.4| + |0.2 - 0|) = 0.3
    assert label_shift({"a": 0.6, "b": 0.4}, {"a": 0.3, "b": 0.5, "c": 0.2}) == pytest.approx(0.3)
    assert label_shift({"a": 1.0}, {"a": 1.0}) == 0


REFERENCE = ReferenceProfile(
    rows=100,
    length=Histogram([10, 20], [0.25, 0.5, 0.25]),
    confidence=Histogram([0.9], [0.5, 0.5]),
    oov=Histogram([0.1], [0.8, 0.2]),
    oov_mean=0.05,
    predicted_labels={"a": 0.5, "b": 0.5},
    training_labels={"a": 0.5, "b": 0.5},
    vocabulary_size=100,
)


def window(n: int = 4) -> pd.DataFrame:
    rows = {
        "seq": [11, 12, 14, 17],
        "created_at": ["t1", "t2", "t3", "t4"],
        "length": [5, 15, 15, 30],  # bins 0, 1, 1, 2: the reference's shares exactly
        "confidence": [0.95, 0.95, 0.95, 0.5],  # bins 1, 1, 1, 0
        "oov_rate": [0.0, 0.2, 0.4, None],  # no vocabulary for the last: left out
        "label": ["a", "a", "a", "b"],
    }
    return pd.DataFrame(rows).head(n)


def test_drift_by_hand():
    result = drift(REFERENCE, window(), "7", min_window=4)
    assert result.judged and result.rows == 4 and (result.first, result.last) == ("t1", "t4")
    assert (result.first_seq, result.last_seq) == (11, 17)
    assert result.length_psi == pytest.approx(0)
    assert result.confidence_shares == [0.25, 0.75]
    # (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5) = 0.25 ln 2 + 0.25 ln 1.5
    assert result.confidence_psi == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5))
    assert result.label_shift == pytest.approx(0.25)  # 1/2 (|0.75 - 0.5| + |0.25 - 0.5|)
    assert result.oov_mean == pytest.approx(0.2) and result.oov_drift == pytest.approx(0.15)
    assert result.exceeded(RC) == [
        "confidence PSI 0.275 > retrain.max_psi 0.25",
        "label shift 0.250 > retrain.max_label_shift 0.2",
        "OOV drift 0.150 > retrain.max_oov_drift 0.1",
    ]
    lenient = RetrainConfig(max_psi=1, max_label_shift=0.5, max_oov_drift=0.5)
    assert result.exceeded(lenient) == []


def test_a_window_below_the_minimum_is_not_judged():
    result = drift(REFERENCE, window(), "7", min_window=5)
    assert not result.judged and result.exceeded(RC) == []
    empty = drift(REFERENCE, window(0), "7", min_window=5)
    assert empty.rows == 0 and empty.first is None and math.isnan(empty.length_psi)
    assert empty.to_dict()["length_psi"] is None  # JSON has no NaN
    assert {r["state"] for r in stage.table(empty, RC, 5)} == {"not measured"}


def test_an_unmeasured_figure_is_not_called_ok():
    no_vocabulary = window().assign(oov_rate=None)
    result = drift(REFERENCE, no_vocabulary, "7", min_window=4)
    rows = {r["statistic"]: r for r in stage.table(result, RC, 4)}
    assert rows["OOV drift"]["value"] == "-" and rows["OOV drift"]["state"] == "not measured"
    assert rows["label shift"]["state"] == "over"


def test_bin_names_follow_the_binning():
    from flywheel.models.profile import shares

    assert stage.bin_names([0.0, 0.5]) == ["<0", "[0, 0.5)", ">=0.5"]
    assert shares([0.0, 0.5], [0.0, 0.5]) == [0.0, 0.5, 0.5]  # 0 is in "[0, 0.5)", 0.5 in ">=0.5"
    assert stage.bin_names([]) == ["all"]


def test_report_files_hold_the_numbers(tmp_path):
    cfg = load_config(REPO / "params.yaml")
    result = drift(REFERENCE, window(), "7", min_window=4)
    out = stage.write_report(result, REFERENCE, cfg, tmp_path / "report")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "drift.html",
        "drift.json",
        "drift.md",
        "drift.png",
    ]
    saved = json.loads((out / "drift.json").read_text())
    assert saved["confidence_psi"] == pytest.approx(result.confidence_psi)
    assert len(saved["exceeded"]) == 3
    assert "| confidence PSI | 0.2747 | 0.25 | over |" in (out / "drift.md").read_text()
    html = (out / "drift.html").read_text()
    assert "data:image/png;base64," in html and "0.2747" in html
    assert (out / "drift.png").read_bytes()[:4] == b"\x89PNG"


class StubRegistry:
    """What monitor() needs of the registry: versions by ref and their profiles."""

    def __init__(self, profiles):
        self.profiles = profiles

    def version(self, ref):
        return type("Info", (), {"version": {"champion": "2"}.get(ref, ref)})

    def reference(self, number):
        return self.profiles.get(number)


def test_monitor_reads_the_versions_newest_predictions(tmp_path, monkeypatch):
    from flywheel import registry

    log_path = tmp_path / "predictions.db"
    cfg = load_config(
        REPO / "params.yaml",
        {"monitor.predictions_path": str(log_path), "monitor.min_window": 10, "monitor.window": 10},
    )
    monkeypatch.setattr(
        registry.ModelRegistry, "of", classmethod(lambda cls, c: StubRegistry({"2": REFERENCE}))
    )
    log = predictions.PredictionLog(log_path, keep=1000)
    log.write([row(f"old{i}", "1", 5) for i in range(30)])  # another version: not in the window
    log.write([row(f"new{i}", "2", 5 if i < 20 else 30) for i in range(25)])
    log.close()
    result, reference = stage.monitor(cfg, "champion")
    assert reference is REFERENCE and result.model_version == "2"
    assert result.rows == 10 and result.judged  # the newest 10 of version 2: 5 short, 5 long
    assert result.length_shares == [0.5, 0.0, 0.5]
    assert stage.monitor(cfg, "2", window=3)[0].length_shares == [0.0, 0.0, 1.0]
    monkeypatch.setattr(registry.ModelRegistry, "of", classmethod(lambda cls, c: StubRegistry({})))
    with pytest.raises(MonitorError, match="version 2 was exported before reference profiles"):
        stage.monitor(cfg)


def row(pid: str, version: str, length: int) -> predictions.LoggedPrediction:
    return predictions.LoggedPrediction(pid, predictions.now(), version, "h", length, "a", 0.9, 0.1)


def test_cli_help_explains_the_statistics():
    out = CliRunner().invoke(app, ["monitor", "--help"])
    assert out.exit_code == 0 and "PSI" in out.output and "--window" in out.output
