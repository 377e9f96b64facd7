"""Retrain from the base model, or warm-start from the champion's weights? Both, in one run.

    .venv/bin/python benchmarks/warm_start.py             # after `flywheel demo feedback`
    .venv/bin/python benchmarks/warm_start.py --version 1
    .venv/bin/python benchmarks/warm_start.py --base-version 2   # the demo's retrain as base

On the current prepared data (after the demo: the movie snippets plus the Amazon feedback),
trains the default configuration twice with the same data, seed and epochs: once from the
pretrained base model (today's retrain) and once starting from the fine-tuned PyTorch weights of
a registered version (default: `previous`, the champion before the demo's retrain; the weights
come from its MLflow `train` run). Scores both on the test split (overall and per source) and on
the demo's held-back Amazon half. Writes benchmarks/results/warm_start.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import mlflow.artifacts
import numpy as np
import pandas as pd
from mlflow.entities import Run

from flywheel import gates
from flywheel.cli.demo import snippets, split_halves
from flywheel.config import load_config
from flywheel.models.bundle import ClassifierBundle
from flywheel.registry import CHAMPION, PREVIOUS, ModelRegistry
from flywheel.slices import slice_masks
from flywheel.tasks.train import fit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def train_run(registry: ModelRegistry, version: str) -> Run:
    """The MLflow `train` run of a registered version's pipeline run."""
    info = registry.version(version)
    parent = info.tags["flywheel.mlflow_run_id"]
    found = registry.client.search_runs(
        [registry.client.get_run(parent).info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent}' and tags.`flywheel.stage` = 'train'",
    )
    if not found:
        raise SystemExit(f"version {version}: no train run under pipeline run {parent}")
    return found[0]


def training_bundle(registry: ModelRegistry, version: str, dst: Path) -> Path:
    """The PyTorch bundle a registered version was exported from (its `train` run's model)."""
    path = mlflow.artifacts.download_artifacts(
        run_id=train_run(registry, version).info.run_id,
        artifact_path="model",
        dst_path=str(dst),
        tracking_uri=registry.uri,
    )
    return Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", help="warm-start from this version (default: previous)")
    parser.add_argument(
        "--base-version",
        help="take this registered version's training (from the base model, on the same data, "
        "seed and epochs: the demo's retrain) as the base-model run instead of training again",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(ROOT / "params.yaml")
    registry = ModelRegistry.of(cfg)
    version = args.version or registry.alias(PREVIOUS) or registry.alias(CHAMPION)
    prepared = cfg.resolve(cfg.split.prepared_dir)
    splits = {s: pd.read_parquet(prepared / f"{s}.parquet") for s in ("train", "val", "test")}
    test = splits["test"]
    held_back = split_halves(snippets(cfg), cfg.seed, None, frozenset(), cfg.clean.mask_pii)
    held = held_back.held_back
    rows = []
    with tempfile.TemporaryDirectory(prefix="flywheel-warm-") as tmp:
        start_from = training_bundle(registry, version, Path(tmp))
        variants = {"base model": cfg.train.base_model, f"warm start (v{version})": start_from}
        for name, base in variants.items():
            label = name
            if name == "base model" and args.base_version:
                label = f"{name} (v{args.base_version}, the demo's retrain)"
                model_dir = training_bundle(registry, args.base_version, Path(tmp) / "base")
                metrics = train_run(registry, args.base_version).data.metrics
                seconds, val_f1 = metrics["train_seconds"], metrics["best_val_macro_f1"]
            else:
                run_cfg = load_config(
                    ROOT / "params.yaml",
                    {
                        "train.base_model": str(base),
                        "train.checkpoint_dir": str(Path(tmp) / name.split()[0]),
                        "train.checkpoint_every_steps": 10_000,
                    },
                )
                started = time.perf_counter()
                result = fit(run_cfg, splits["train"], splits["val"], f"warm-start-{name}")
                seconds, val_f1 = time.perf_counter() - started, result.best_val_macro_f1
                model_dir = result.model_dir
            bundle = ClassifierBundle.load(model_dir)
            labels = np.asarray(bundle.labels)
            answers = labels[bundle.predict_proba(test["text"].tolist()).argmax(axis=1)]
            own = gates.compare(
                test["label"].tolist(),
                list(answers),
                list(answers),
                slice_masks(test),
                cfg.registry,
                0,
            )
            held_answers = labels[bundle.predict_proba(held["text"].tolist()).argmax(axis=1)]
            rows.append(
                {
                    "variant": label,
                    "seconds": round(seconds, 1),
                    "best_val_macro_f1": round(val_f1, 4),
                    "test": {f"{e.slice}|{e.metric}": round(e.candidate, 4) for e in own.estimates},
                    "test_rows": {e.slice: e.rows for e in own.estimates},
                    "held_back_accuracy": round(
                        float((held_answers == held["label"].to_numpy()).mean()), 4
                    ),
                    "held_back_rows": len(held),
                    "answers": list(answers),
                }
            )
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "answers"}), flush=True)
    base_answers, warm_answers = rows[0].pop("answers"), rows[1].pop("answers")
    paired = gates.compare(
        test["label"].tolist(),
        warm_answers,
        base_answers,
        slice_masks(test),
        cfg.registry,
        cfg.seed,
    )
    record = {
        "machine": platform.platform(),
        "warm_start_from": version,
        "settings": cfg.section("train"),
        "rows": {s: len(f) for s, f in splits.items()},
        "results": rows,
        "warm_minus_base": [e.text() for e in paired.estimates],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "warm_start.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "warm_start.md").write_text(markdown(record))
    print(markdown(record))


def markdown(record: dict) -> str:
    keys = [k for k in record["results"][0]["test"] if k.endswith("|accuracy")]
    header = ["variant", "val macro-F1", *[f"test acc {k.split('|')[0]}" for k in keys]]
    header += ["held-back Amazon acc", "train time", "time vs base"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    first = record["results"][0]["seconds"]
    for r in record["results"]:
        cells = [r["variant"], f"{r['best_val_macro_f1']:.4f}"]
        cells += [f"{r['test'][k]:.4f} ({r['test_rows'][k.split('|')[0]]:,})" for k in keys]
        cells += [f"{r['held_back_accuracy']:.4f}", f"{r['seconds']:.0f} s"]
        cells.append(f"{r['seconds'] / first:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Warm start minus base model, paired on the same test texts:", ""]
    lines += [f"- {t}" for t in record["warm_minus_base"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
