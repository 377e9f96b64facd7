"""Train: fine-tune the pretrained transformer on the prepared train split.

Read `fit` top to bottom: data order, optimizer and schedule, the step loop, validation with
early stopping, checkpoints. A checkpoint describes itself (config, data version, step, epoch,
metrics, RNG states) and `resume=True` continues from it to the same result as an
uninterrupted run: the data order of every epoch is a function of (seed, epoch) only. With no
checkpoint of the same run (config, seed, data), or one whose best model is gone, it starts over.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import runtime, tracking
from flywheel.config import Config
from flywheel.io import read_parquet, recover_dir, replace_dir_atomic
from flywheel.models.bundle import BUNDLE_FILE, ClassifierBundle, Preprocessing
from flywheel.tasks.prepare import PrepareResult

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
    from flywheel.cache import Stage, stage_key

    return stage_key(cfg, Stage.TRAIN, data_version, {}).digest[:12]


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_labels: int) -> float:
    """Mean F1 over labels (a label never predicted nor present scores 0)."""
    from sklearn.metrics import f1_score

    return float(
        f1_score(y_true, y_pred, labels=list(range(n_labels)), average="macro", zero_division=0)
    )


def fit(
    cfg: Config,
    train_frame: pd.DataFrame,
    val_frame: pd.DataFrame,
    data_version: str,
    *,
    device: runtime.Device | None = None,
    resume: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Fine-tune on `train_frame`, select the best checkpoint by validation macro-F1."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

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
    label_ids = {label: i for i, label in enumerate(labels)}
    train_rows = _rows(bundle, train_frame, label_ids)
    val_rows = _rows(bundle, val_frame, label_ids)
    batches_per_epoch = math.ceil(len(train_rows) / tc.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / tc.grad_accum_steps)
    total_steps = steps_per_epoch * tc.epochs
    eval_every = tc.eval_every_steps or steps_per_epoch

    # Optimizer: AdamW without decay on biases and LayerNorm weights; linear warm-up and decay.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": tc.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=tc.lr,
    )
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(tc.warmup_ratio * total_steps), total_steps
    )
    scaler = torch.amp.GradScaler(device.type, enabled=device.grad_scaler)
    autocast_dtype = getattr(torch, device.autocast_dtype) if device.autocast_dtype else None

    state = {
        "step": 0,
        "epoch": 0,
        "batch": 0,
        "best": -1.0,
        "best_step": 0,
        "bad_evals": 0,
        "history": [],
        "losses": [],
        "stopped": False,  # early-stopped: a resume must not train on
        "seconds": 0.0,  # training time and samples over every session of this run
        "samples": 0,
    }
    resumed_from = None
    if resume:
        recover_dir(last_dir)
        recover_dir(best_dir)
        meta = last_dir / META_FILE
        if not ((last_dir / STATE_FILE).is_file() and meta.is_file()):
            resume = False  # nothing of this run (config, seed, data) yet
        elif json.loads(meta.read_text())["best_step"] and not (best_dir / BUNDLE_FILE).is_file():
            log.warning("train: the best model of %s is gone; training again", run_dir)
            resume = False
    if resume:
        state = _load_checkpoint(last_dir, model, optimizer, scheduler, scaler)
        resumed_from = state["step"]
        log.info(
            "train: resuming %s at step %d (epoch %d)", run_dir.name, state["step"], state["epoch"]
        )
    elif run_dir.exists():
        shutil.rmtree(run_dir)

    log.info(
        "train: %s texts, %d labels, %d steps on %s",
        f"{len(train_rows):,}",
        len(labels),
        total_steps,
        device,
    )
    started, seconds_before, samples_now, running = time.perf_counter(), state["seconds"], 0, []
    stop = state["stopped"]
    progress = tqdm(
        total=total_steps, initial=state["step"], desc="train", unit="step", disable=None
    )
    for epoch in range(state["epoch"], tc.epochs):
        if stop:
            break
        order = torch.randperm(
            len(train_rows), generator=torch.Generator().manual_seed(cfg.seed + epoch)
        ).tolist()
        model.train()
        first_batch = state["batch"] if epoch == state["epoch"] else 0
        for batch_index in range(first_batch, batches_per_epoch):
            ids = order[batch_index * tc.batch_size : (batch_index + 1) * tc.batch_size]
            batch = bundle.pad([train_rows[i] for i in ids])
            batch = {k: v.to(device.type) for k, v in batch.items()}
            with torch.autocast(
                device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                loss = model(**batch).loss / tc.grad_accum_steps
            scaler.scale(loss).backward()
            running.append(loss.item() * tc.grad_accum_steps)
            samples_now += len(ids)
            state["samples"] += len(ids)
            if (batch_index + 1) % tc.grad_accum_steps and batch_index + 1 != batches_per_epoch:
                continue

            # One optimizer step.
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["epoch"], state["batch"] = epoch, batch_index + 1
            state["seconds"] = seconds_before + time.perf_counter() - started
            rate = samples_now / (time.perf_counter() - started)
            progress.update(1)
            progress.set_postfix(loss=f"{np.mean(running):.4f}", samples_s=f"{rate:.1f}")
            if state["step"] % tc.log_every_steps == 0:
                state["losses"].append((state["step"], float(np.mean(running))))
                running = []

            if state["step"] % eval_every == 0 or state["step"] == total_steps:
                score = _evaluate(bundle, val_rows, tc.batch_size, len(labels))
                state["history"].append(
                    {"step": state["step"], "epoch": epoch + 1, "val_macro_f1": score}
                )
                log.info("train: step %d val macro-F1 %.4f", state["step"], score)
                if score > state["best"]:
                    state.update(best=score, best_step=state["step"], bad_evals=0)
                    replace_dir_atomic(best_dir, bundle.save)
                else:
                    state["bad_evals"] += 1
                    stop = state["stopped"] = state["bad_evals"] >= tc.early_stopping_patience
                model.train()
            if state["step"] % tc.checkpoint_every_steps == 0 or stop:
                _save_checkpoint(
                    last_dir, bundle, optimizer, scheduler, scaler, state, cfg, data_version
                )
            if on_step is not None:
                on_step(state["step"])
            if stop:
                log.info(
                    "train: early stop at step %d (best %d)", state["step"], state["best_step"]
                )
                break
        if stop:
            break
        state["epoch"], state["batch"] = epoch + 1, 0
    progress.close()
    _save_checkpoint(last_dir, bundle, optimizer, scheduler, scaler, state, cfg, data_version)
    return TrainResult(
        model_dir=best_dir,
        best_val_macro_f1=state["best"],
        best_step=state["best_step"],
        steps=state["step"],
        seconds=state["seconds"],
        samples_per_second=state["samples"] / state["seconds"] if state["seconds"] else 0.0,
        device=str(device),
        history=state["history"],
        losses=[tuple(x) for x in state["losses"]],
        resumed_from_step=resumed_from,
    )


def _rows(bundle: ClassifierBundle, frame: pd.DataFrame, label_ids: dict[str, int]) -> list[dict]:
    encoded = bundle.encode(frame["text"].tolist())
    labels = [label_ids[label] for label in frame["label"]]
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": label}
        for ids, mask, label in zip(
            encoded["input_ids"], encoded["attention_mask"], labels, strict=True
        )
    ]


def _evaluate(bundle: ClassifierBundle, rows: list[dict], batch_size: int, n_labels: int) -> float:
    """Validation macro-F1 of the current weights."""
    predicted = bundle.logits_of_encoded(rows, batch_size).argmax(axis=1)
    return macro_f1(np.array([r["labels"] for r in rows]), predicted, n_labels)


def _save_checkpoint(directory, bundle, optimizer, scheduler, scaler, state, cfg, data_version):
    """Model + optimizer/scheduler/scaler + RNG states + a readable checkpoint.json, swapped in
    whole: a run killed while saving still has its previous checkpoint."""
    import torch

    def write(staging: Path) -> None:
        bundle.save(staging)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": {
                    "python": random.getstate(),
                    "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                },
                "state": state,
            },
            staging / STATE_FILE,
        )
        meta = {
            "step": state["step"],
            "epoch": state["epoch"],
            "batch": state["batch"],
            "best_val_macro_f1": state["best"],
            "best_step": state["best_step"],
            "history": state["history"],
            "data_version": data_version,
            "seed": cfg.seed,
            "train": cfg.section("train"),
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    replace_dir_atomic(directory, write)


def _load_checkpoint(directory, model, optimizer, scheduler, scaler) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(directory)
    model.load_state_dict(saved.state_dict())
    payload = torch.load(directory / STATE_FILE, weights_only=False)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if payload["scaler"]:  # empty when saved without loss scaling (CPU, bf16)
        scaler.load_state_dict(payload["scaler"])
    random.setstate(payload["rng"]["python"])
    np.random.set_state(payload["rng"]["numpy"])
    torch.set_rng_state(payload["rng"]["torch"])
    if payload["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    return payload["state"]


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
