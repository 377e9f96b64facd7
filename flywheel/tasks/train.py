"""Train: fine-tune the pretrained transformer on the prepared train split.

Read `fit` top to bottom: data order, optimizer and schedule, the step loop, validation with
early stopping, checkpoints. A checkpoint describes itself (config, data version, step, epoch,
metrics, RNG states) and `resume=True` continues from it to the same result as an
uninterrupted run: the data order of every epoch is a function of (seed, epoch) only. With no
checkpoint of the same run (config, seed, data), or one whose best model is gone, it starts over.
Settings and measured figures: docs/training.md.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import runtime, tracking
from flywheel.cache import stage_key
from flywheel.config import Config, TrainConfig
from flywheel.io import read_parquet, recover_dir, replace_dir_atomic
from flywheel.metrics import label_ids, macro_f1
from flywheel.models.bundle import BUNDLE_FILE, ClassifierBundle, Preprocessing
from flywheel.progress import progress
from flywheel.stages import StageSpec
from flywheel.tasks.prepare import PrepareResult

STAGE = StageSpec(
    name="train",
    module=__name__,
    reads=("seed", "clean.mask_pii", "train"),
    artifacts=("model_dir",),
)

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
META_FILE = "checkpoint.json"


@dataclass(frozen=True)
class TrainResult:
    """The best model and how training went."""

    model_dir: Path
    best_val_macro_f1: float
    best_step: int
    steps: int
    seconds: float
    samples_per_second: float
    device: str
    history: list[dict[str, float]] = field(default_factory=list)  # one row per validation
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss)
    resumed_from_step: int | None = None
    run_id: str | None = None  # the MLflow run, when trained by the pipeline


def run_key(cfg: Config, data_version: str) -> str:
    """Identifies a training run: a checkpoint only resumes the run with the same key. It is the
    train stage's cache key (flywheel/cache.py): data version, train config, seed, the training
    code and the ML stack, so a re-run after a code or torch change trains anew."""
    return stage_key(cfg, STAGE, data_version, {}).digest[:12]


@dataclass
class TrainState:
    """Where a run is. Saved in every checkpoint (`state` in trainer_state.pt, as a dict with
    these keys) and restored on resume."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # the next batch of `epoch`
    best: float = -1.0  # best validation macro-F1 so far
    best_step: int = 0
    bad_evals: int = 0  # validations since the best one
    history: list[dict[str, float]] = field(default_factory=list)  # one row per validation
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss)
    stopped: bool = False  # early-stopped: a resume must not train on
    seconds: float = 0.0  # training time and samples over every session of this run
    samples: int = 0

    def record_validation(self, score: float, epoch: int, patience: int) -> bool:
        """Record a validation; True if it is the best so far. `patience` validations in a row
        without a better score stop the run."""
        self.history.append({"step": self.step, "epoch": epoch + 1, "val_macro_f1": score})
        if score > self.best:
            self.best, self.best_step, self.bad_evals = score, self.step, 0
            return True
        self.bad_evals += 1
        self.stopped = self.bad_evals >= patience
        return False


@dataclass(frozen=True)
class Optimization:
    """AdamW without decay on biases and LayerNorm weights, a linear warm-up and decay of the
    learning rate, and a loss scaler (active only where the device needs one: fp16 on CUDA)."""

    optimizer: Any
    scheduler: Any
    scaler: Any

    @classmethod
    def of(
        cls, model: Any, tc: TrainConfig, total_steps: int, device: runtime.Device
    ) -> Optimization:
        import torch
        from transformers import get_linear_schedule_with_warmup

        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": tc.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=tc.lr,
            # One fused kernel per step instead of a dozen ops per tensor: the optimizer's time
            # per step falls to about a third on CPU (docs/decisions/0017).
            fused=True if device.type in ("cpu", "cuda") else None,
        )
        scheduler = get_linear_schedule_with_warmup(
            optimizer, int(tc.warmup_ratio * total_steps), total_steps
        )
        return cls(
            optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=device.grad_scaler)
        )

    def step(self, model: Any, max_grad_norm: float) -> None:
        """One update from the accumulated gradients: unscale, clip their norm, step the
        optimizer and the schedule, clear them."""
        import torch

        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


class Progress:
    """This session's loss and throughput: the progress bar (or its log lines), the run's time
    and the points of its loss curve (one per `log_every` steps, the mean loss since the last
    one). A context manager: the bar ends with the loop, however it ends."""

    def __init__(self, state: TrainState, total_steps: int, log_every: int):
        self.state, self.log_every = state, log_every
        self.started, self.seconds_before = time.perf_counter(), state.seconds
        self.samples, self.running = 0, []
        self.shown = progress(
            "train", total_steps, unit="step", completed=state.step, every=log_every, logger=log
        )

    def __enter__(self) -> Progress:
        self.bar = self.shown.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shown.__exit__(*exc)

    def batch(self, loss: float, samples: int) -> None:
        """A batch's (unscaled) loss and its number of texts."""
        self.running.append(loss)
        self.samples += samples
        self.state.samples += samples

    def step(self) -> None:
        """After an optimizer step: time, bar, and a point of the loss curve when due."""
        state, elapsed = self.state, time.perf_counter() - self.started
        state.seconds = self.seconds_before + elapsed
        loss = float(np.mean(self.running))
        self.bar.advance(loss=loss, **{"samples/s": f"{self.samples / elapsed:.1f}"})
        if state.step % self.log_every == 0:
            state.losses.append((state.step, loss))
            self.running = []


def fit(
    cfg: Config,
    train_frame: pd.DataFrame,
    val_frame: pd.DataFrame,
    data_version: str,
    *,
    device: runtime.Device | None = None,
    resume: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:  # ~95 lines: setup, then the whole loop on one screen (nanoGPT style)
    """Fine-tune on `train_frame`, select the best checkpoint by validation macro-F1."""
    import torch

    tc = cfg.train
    device = device or runtime.select_device(tc.device, tc.precision)
    runtime.set_threads(tc.threads)
    runtime.seed_everything(cfg.seed)
    if tc.max_train_rows:
        train_frame = train_frame.head(tc.max_train_rows)
    labels = sorted(set(train_frame["label"]) | set(val_frame["label"]))
    run_dir = cfg.resolve(tc.checkpoint_dir) / run_key(cfg, data_version)
    last_dir, best_dir = run_dir / "last", run_dir / "best"

    # Model and data. Texts are tokenised once; batches are padded to their own longest text.
    bundle = ClassifierBundle.from_base(tc.base_model, labels, Preprocessing.of(cfg))
    model = bundle.model.to(device.type)
    _for_training(model, device, tc.dropout)
    train_rows, val_rows = (_rows(bundle, frame, labels) for frame in (train_frame, val_frame))
    lengths = [len(row["input_ids"]) for row in train_rows]
    batches_per_epoch = math.ceil(len(train_rows) / tc.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / tc.grad_accum_steps)
    total_steps = steps_per_epoch * tc.epochs
    eval_every = tc.eval_every_steps or steps_per_epoch
    opt = Optimization.of(model, tc, total_steps, device)
    autocast_dtype = getattr(torch, device.autocast_dtype) if device.autocast_dtype else None

    # This run's last checkpoint, or a fresh start.
    state, resumed_from = _start(run_dir, model, opt, resume)
    log.info(
        "train: %s texts, %d labels, %d steps on %s",
        f"{len(train_rows):,}",
        len(labels),
        total_steps,
        device,
    )

    with Progress(state, total_steps, tc.log_every_steps) as progress:
        for epoch in range(state.epoch, tc.epochs):
            if state.stopped:
                break
            # The data order of an epoch depends on (seed, epoch) only: a resume sees the same.
            order = epoch_batches(lengths, tc.batch_size, cfg.seed + epoch, tc.group_by_length)
            model.train()
            first_batch = state.batch if epoch == state.epoch else 0
            for batch_index in range(first_batch, batches_per_epoch):
                # Forward and backward; gradients accumulate over grad_accum_steps batches.
                ids = order[batch_index]
                batch = bundle.pad([train_rows[i] for i in ids])
                batch = {k: v.to(device.type) for k, v in batch.items()}
                with torch.autocast(
                    device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
                ):
                    loss = model(**batch).loss / tc.grad_accum_steps
                opt.scaler.scale(loss).backward()
                progress.batch(loss.item() * tc.grad_accum_steps, len(ids))
                if (batch_index + 1) % tc.grad_accum_steps and batch_index + 1 != batches_per_epoch:
                    continue

                # One optimizer step.
                opt.step(model, tc.max_grad_norm)
                state.step += 1
                state.epoch, state.batch = epoch, batch_index + 1
                progress.step()

                # Validation: keep the best model; stop after `patience` validations without gain.
                if state.step % eval_every == 0 or state.step == total_steps:
                    score = _evaluate(bundle, val_rows, tc.batch_size, len(labels))
                    log.info("train: step %d val macro-F1 %.4f", state.step, score)
                    if state.record_validation(score, epoch, tc.early_stopping_patience):
                        replace_dir_atomic(best_dir, bundle.save)
                    model.train()

                # Checkpoint, so a killed run resumes here.
                if state.step % tc.checkpoint_every_steps == 0 or state.stopped:
                    _save_checkpoint(last_dir, bundle, opt, state, cfg, data_version)
                if on_step is not None:
                    on_step(state.step)
                if state.stopped:
                    log.info("train: early stop at step %d (best %d)", state.step, state.best_step)
                    break
            if state.stopped:
                break
            state.epoch, state.batch = epoch + 1, 0
    _save_checkpoint(last_dir, bundle, opt, state, cfg, data_version)
    return _result(state, best_dir, device, resumed_from)


def _for_training(model: Any, device: runtime.Device, dropout: float | None) -> None:
    """The training-time settings of the model: `dropout` on every dropout layer (None: the
    base model's), and on CPU the eager attention: with dropout 0, torch's sdpa picks a CPU
    flash kernel whose bf16 backward is 1.6x slower than the eager one (docs/decisions/0017)."""
    if dropout is not None:
        set_dropout(model, dropout)
    if device.type == "cpu" and getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation("eager")


def set_dropout(model: Any, rate: float) -> None:
    """`rate` on every dropout layer of `model` (hidden, attention probabilities, head)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = rate


def _result(
    state: TrainState, best_dir: Path, device: runtime.Device, resumed_from: int | None
) -> TrainResult:
    """The run as TrainResult reports it."""
    return TrainResult(
        model_dir=best_dir,
        best_val_macro_f1=state.best,
        best_step=state.best_step,
        steps=state.step,
        seconds=state.seconds,
        samples_per_second=state.samples / state.seconds if state.seconds else 0.0,
        device=str(device),
        history=state.history,
        losses=[tuple(x) for x in state.losses],
        resumed_from_step=resumed_from,
    )


POOL_BATCHES = 50  # group_by_length sorts within pools of this many batches


def epoch_batches(
    lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool
) -> list[list[int]]:
    """One epoch's batches of row indices: a shuffle of every row (by `seed`), cut in batches.

    With `group_by_length`, each pool of `POOL_BATCHES` batches of the shuffle is sorted by token
    length before it is cut, and the batches are shuffled again: a batch holds texts of similar
    length (little padding) yet comes from anywhere in the epoch; the number of batches is the
    same (every pool but the last is a whole number of batches)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    pool = batch_size * POOL_BATCHES
    batches = []
    for start in range(0, len(order), pool):
        members = sorted(order[start : start + pool], key=lengths.__getitem__)  # stable
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def _rows(bundle: ClassifierBundle, frame: pd.DataFrame, labels: list[str]) -> list[dict]:
    """Each text tokenised, with its label's id (its position in `labels`)."""
    encoded = bundle.encode(frame["text"].tolist())
    ids = label_ids(frame["label"].tolist(), labels)
    return [
        {"input_ids": tokens, "attention_mask": mask, "labels": int(label)}
        for tokens, mask, label in zip(
            encoded["input_ids"], encoded["attention_mask"], ids, strict=True
        )
    ]


def _evaluate(bundle: ClassifierBundle, rows: list[dict], batch_size: int, n_labels: int) -> float:
    """Validation macro-F1 of the current weights."""
    predicted = bundle.logits_of_encoded(rows, batch_size).argmax(axis=1)
    return macro_f1(np.array([r["labels"] for r in rows]), predicted, n_labels)


# --- checkpoints --------------------------------------------------------------------------------


def _start(
    run_dir: Path, model: Any, opt: Optimization, resume: bool
) -> tuple[TrainState, int | None]:
    """Where training starts, and the step it resumes from: the run's last checkpoint if
    `resume` and there is one to resume (model, optimizer and RNG states restored), else step 0
    with the run's folder cleared."""
    if resume and _resumable(run_dir):
        state = _load_checkpoint(run_dir / "last", model, opt)
        log.info("train: resuming %s at step %d (epoch %d)", run_dir.name, state.step, state.epoch)
        return state, state.step
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return TrainState(), None


def _resumable(run_dir: Path) -> bool:
    """Whether `run_dir` holds a checkpoint to resume (either of its folders is first
    recovered, if a crash interrupted its replacement): a complete last checkpoint, and the
    best model it refers to."""
    last_dir, best_dir = run_dir / "last", run_dir / "best"
    recover_dir(last_dir)
    recover_dir(best_dir)
    meta = last_dir / META_FILE
    if not ((last_dir / STATE_FILE).is_file() and meta.is_file()):
        return False  # nothing of this run (config, seed, data) yet
    if json.loads(meta.read_text())["best_step"] and not (best_dir / BUNDLE_FILE).is_file():
        log.warning("train: the best model of %s is gone; training again", run_dir)
        return False
    return True


def _save_checkpoint(
    directory: Path,
    bundle: ClassifierBundle,
    opt: Optimization,
    state: TrainState,
    cfg: Config,
    data_version: str,
) -> None:
    """Model + optimizer/scheduler/scaler + RNG states + a readable checkpoint.json, swapped in
    whole: a run killed while saving still has its previous checkpoint."""
    import torch

    def write(staging: Path) -> None:
        bundle.save(staging)
        torch.save(
            {
                "optimizer": opt.optimizer.state_dict(),
                "scheduler": opt.scheduler.state_dict(),
                "scaler": opt.scaler.state_dict(),
                "rng": {
                    "python": random.getstate(),
                    "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                },
                "state": asdict(state),
            },
            staging / STATE_FILE,
        )
        meta = {
            "step": state.step,
            "epoch": state.epoch,
            "batch": state.batch,
            "best_val_macro_f1": state.best,
            "best_step": state.best_step,
            "history": state.history,
            "data_version": data_version,
            "seed": cfg.seed,
            "train": cfg.section("train"),
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    replace_dir_atomic(directory, write)


def _load_checkpoint(directory: Path, model: Any, opt: Optimization) -> TrainState:
    """Weights, optimizer/scheduler/scaler and RNG states of the checkpoint in `directory`;
    returns where the run was."""
    import torch
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(directory)
    model.load_state_dict(saved.state_dict())
    payload = torch.load(directory / STATE_FILE, weights_only=False)
    opt.optimizer.load_state_dict(payload["optimizer"])
    opt.scheduler.load_state_dict(payload["scheduler"])
    if payload["scaler"]:  # empty when saved without loss scaling (CPU, bf16)
        opt.scaler.load_state_dict(payload["scaler"])
    random.setstate(payload["rng"]["python"])
    np.random.set_state(payload["rng"]["numpy"])
    torch.set_rng_state(payload["rng"]["torch"])
    if payload["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    return TrainState(**payload["state"])


@task(name="train", cache_policy=NO_CACHE)
def train_task(
    cfg: Config, prepared: PrepareResult, parent: tracking.RunRef, resume: bool = True
) -> TrainResult:
    """Fine-tune on the prepared splits, tracked as the `train` run: curves, best model.
    `resume` continues this run's last checkpoint if there is one (after a crash)."""
    paths = prepared.split_paths
    train_frame, val_frame = read_parquet(paths["train"]), read_parquet(paths["val"])
    device = runtime.select_device(cfg.train.device, cfg.train.precision)
    tags = {"flywheel.device": str(device), "flywheel.resume": str(resume).lower()}
    with tracking.stage_run(cfg, "train", parent, tags) as run:
        tracking.log_dataset(run, train_frame, paths["train"], "train")
        tracking.log_dataset(run, val_frame, paths["val"], "val")
        result = fit(
            cfg, train_frame, val_frame, parent.lineage.data_version, device=device, resume=resume
        )
        points = [("train_loss", loss, step) for step, loss in result.losses]
        for row in result.history:
            points += [("val_macro_f1", row["val_macro_f1"], row["step"])]
            points += [("epoch", row["epoch"], row["step"])]
        tracking.log_metrics(run, points)
        tracking.log_scalars(
            run,
            {
                "best_val_macro_f1": result.best_val_macro_f1,
                "best_step": result.best_step,
                "steps": result.steps,
                "train_seconds": result.seconds,
                "samples_per_second": result.samples_per_second,
            },
        )
        if result.resumed_from_step is not None:
            tracking.set_tags(run, {"flywheel.resumed_from_step": str(result.resumed_from_step)})
        tracking.log_artifacts(run, result.model_dir, "model")
    return replace(result, run_id=run.run_id)
