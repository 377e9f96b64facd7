"""The training loop on a tiny slice of the default data: learning, determinism, exact resume."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from flywheel.config import EmbeddedSource, load_config
from flywheel.models.bundle import ClassifierBundle, Preprocessing
from flywheel.runtime import Device
from flywheel.sources import read_embedded
from flywheel.tasks.train import (
    META_FILE,
    STATE_FILE,
    Optimization,
    TrainState,
    _for_training,
    epoch_batches,
    fit,
    run_key,
)
from tests.conftest import REPO

CPU = Device("cpu", None, False)


@pytest.fixture(scope="module")
def slices() -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = read_embedded(EmbeddedSource(kind="embedded"))
    frame = frame.groupby("label").head(60).sample(frac=1.0, random_state=0)  # balanced, shuffled
    return frame.iloc[:80].reset_index(drop=True), frame.iloc[80:].reset_index(drop=True)


def tiny_config(tmp_path, **train):
    settings = {
        "epochs": 3,
        "batch_size": 16,
        "lr": 1e-4,
        "warmup_ratio": 0.0,
        "max_length": 32,
        "eval_every_steps": 5,
        "early_stopping_patience": 10,
        "checkpoint_every_steps": 1,
        "log_every_steps": 1,
        **train,
    }
    return load_config(
        REPO / "params.yaml",
        {
            "train.checkpoint_dir": str(tmp_path / "checkpoints"),
            **{f"train.{k}": v for k, v in settings.items()},
        },
    )


def test_loss_decreases_and_best_model_is_kept(tmp_path, slices):
    cfg = tiny_config(tmp_path)
    result = fit(cfg, *slices, data_version="test.dir", device=CPU)
    assert result.steps == 15  # 80 texts / 16 per batch * 3 epochs
    first, last = result.losses[0][1], result.losses[-1][1]
    assert last < first
    assert [h["step"] for h in result.history] == [5, 10, 15]
    assert result.best_val_macro_f1 == max(h["val_macro_f1"] for h in result.history)
    assert (result.model_dir / "flywheel.json").is_file()
    meta = json.loads((result.model_dir.parent / "last" / META_FILE).read_text())
    assert meta["step"] == 15
    assert meta["data_version"] == "test.dir"
    assert meta["train"]["lr"] == 1e-4
    assert result.samples_per_second > 0
    # the run's state is saved as a plain dict with the keys checkpoints have always had, so a
    # checkpoint written before TrainState existed still resumes
    payload = torch.load(result.model_dir.parent / "last" / STATE_FILE, weights_only=False)
    assert set(payload["state"]) == CHECKPOINT_STATE_KEYS
    assert TrainState(**payload["state"]).step == 15


CHECKPOINT_STATE_KEYS = {
    "step",
    "epoch",
    "batch",
    "best",
    "best_step",
    "bad_evals",
    "history",
    "losses",
    "stopped",
    "seconds",
    "samples",
}


def test_validation_keeps_the_best_and_stops_after_patience():
    state = TrainState(step=5)
    assert state.record_validation(0.6, epoch=0, patience=2)
    state.step = 10
    assert not state.record_validation(0.6, epoch=1, patience=2)  # no gain: not a new best
    assert not state.stopped
    state.step = 15
    assert not state.record_validation(0.5, epoch=2, patience=2)
    assert state.stopped and state.best == 0.6 and state.best_step == 5
    assert [(h["step"], h["epoch"]) for h in state.history] == [(5, 1), (10, 2), (15, 3)]


def test_same_seed_same_metrics(tmp_path, slices):
    cfg = tiny_config(tmp_path, epochs=1)
    first = fit(cfg, *slices, data_version="d.dir", device=CPU)
    second = fit(cfg, *slices, data_version="d.dir", device=CPU)
    assert first.losses == second.losses
    assert first.history == second.history


class Killed(Exception):
    pass


def test_resume_after_a_kill_reaches_the_same_result(tmp_path, slices):
    cfg = tiny_config(tmp_path, checkpoint_every_steps=2)
    straight = fit(cfg, *slices, data_version="d.dir", device=CPU)

    def kill_at_step_7(step: int) -> None:
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        fit(cfg, *slices, data_version="d.dir", device=CPU, on_step=kill_at_step_7)
    resumed = fit(cfg, *slices, data_version="d.dir", device=CPU, resume=True)
    assert resumed.resumed_from_step == 6  # the last checkpoint before the kill
    assert resumed.steps == straight.steps
    assert [h["step"] for h in resumed.history] == [h["step"] for h in straight.history]
    scores = [h["val_macro_f1"] for h in resumed.history]
    assert scores == pytest.approx([h["val_macro_f1"] for h in straight.history], abs=1e-6)
    assert resumed.best_val_macro_f1 == pytest.approx(straight.best_val_macro_f1, abs=1e-6)


def test_resume_without_a_checkpoint_of_the_run_starts_over(tmp_path, slices, caplog):
    """resume=True is the pipeline's default: a run with no checkpoint of its own key (new lr,
    new data) trains from scratch; a checkpoint whose best model was deleted is not resumed."""
    cfg = tiny_config(tmp_path, epochs=1)
    fresh = fit(cfg, *slices, data_version="d.dir", device=CPU, resume=True)
    assert fresh.resumed_from_step is None and fresh.steps > 0
    other = tiny_config(tmp_path, lr=2e-4)
    assert run_key(cfg, "d.dir") != run_key(other, "d.dir")
    assert run_key(cfg, "d.dir") != run_key(cfg, "e.dir")
    shutil.rmtree(fresh.model_dir)
    with caplog.at_level("WARNING", logger="flywheel.tasks.train"):
        again = fit(cfg, *slices, data_version="d.dir", device=CPU, resume=True)
    assert again.resumed_from_step is None and again.steps == fresh.steps
    assert (again.model_dir / "flywheel.json").is_file()
    assert "best model of" in caplog.text and "training again" in caplog.text


def test_an_early_stopped_run_stays_stopped_when_resumed(tmp_path, slices):
    cfg = tiny_config(tmp_path, lr=1e-6, eval_every_steps=1, early_stopping_patience=1)
    stopped = fit(cfg, *slices, data_version="d.dir", device=CPU)
    assert stopped.steps < 15  # a tiny lr leaves validation macro-F1 flat: patience 1 stops it
    meta = json.loads((stopped.model_dir.parent / "last" / META_FILE).read_text())
    assert meta["step"] == stopped.steps
    again = fit(cfg, *slices, data_version="d.dir", device=CPU, resume=True)
    assert again.resumed_from_step == again.steps == stopped.steps
    assert again.history == stopped.history
    # time and throughput cover the whole run, not just the (empty) resumed part
    assert again.seconds == pytest.approx(stopped.seconds)
    assert again.samples_per_second == pytest.approx(stopped.samples_per_second)


def test_length_grouped_batches_hold_every_row_once_with_less_padding():
    rng = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 65, (1000,), generator=rng).tolist()

    def padding(batches):  # padded positions: each batch is padded to its longest text
        return sum(
            max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches
        )

    plain = epoch_batches(lengths, 16, seed=7, group_by_length=False)
    grouped = epoch_batches(lengths, 16, seed=7, group_by_length=True)
    for batches in (plain, grouped):
        assert len(batches) == 63 and sorted(i for b in batches for i in b) == list(range(1000))
        assert all(len(b) == 16 for b in batches if len(b) != 1000 % 16)
    assert grouped == epoch_batches(lengths, 16, seed=7, group_by_length=True)  # resumable
    assert grouped != epoch_batches(lengths, 16, seed=8, group_by_length=True)  # an epoch's own
    assert padding(grouped) < padding(plain) / 5
    # batches come from the whole epoch, not in length order
    longest = [max(lengths[i] for i in b) for b in grouped]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


def test_bf16_autocast_on_cpu_trains_and_keeps_fp32_weights(tmp_path, slices):
    cfg = tiny_config(tmp_path, epochs=2)
    result = fit(cfg, *slices, data_version="d.dir", device=Device("cpu", "bfloat16", False))
    assert result.device == "cpu (bfloat16)"
    losses = [loss for _, loss in result.losses]
    assert losses[-1] < losses[0]
    bundle = ClassifierBundle.load(result.model_dir)
    assert {p.dtype for p in bundle.model.parameters()} == {torch.float32}  # export reads fp32


@pytest.mark.parametrize(
    ("device", "dropout", "attention", "p"),
    [
        (CPU, 0.0, "eager", 0.0),  # the default on CPU: no dropout, eager attention
        (CPU, None, "eager", 0.1),  # null keeps the base model's dropout
        (Device("cuda", "bfloat16", False), 0.2, "sdpa", 0.2),  # CUDA keeps torch's sdpa
    ],
)
def test_training_settings_of_the_model(device, dropout, attention, p):
    cfg = load_config(REPO / "params.yaml")
    bundle = ClassifierBundle.from_base(cfg.train.base_model, ["a", "b"], Preprocessing.of(cfg))
    assert bundle.model.config._attn_implementation == "sdpa"
    _for_training(bundle.model, device, dropout)
    rates = {m.p for m in bundle.model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {p}
    assert bundle.model.config._attn_implementation == attention


@pytest.mark.parametrize(("device", "fused"), [(CPU, True), (Device("mps", None, False), None)])
def test_adamw_is_fused_where_torch_has_the_kernel(device, fused):
    cfg = load_config(REPO / "params.yaml")
    model = torch.nn.Linear(4, 2)
    assert Optimization.of(model, cfg.train, 10, device).optimizer.defaults["fused"] is fused
