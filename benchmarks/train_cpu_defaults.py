"""Which CPU training setting should be the default? Compare variants in one run.

    .venv/bin/python benchmarks/train_cpu_defaults.py            # all variants (~20 min, 2 cores)
    .venv/bin/python benchmarks/train_cpu_defaults.py --only lr1e-4

Trains MiniLM-L6 on the prepared default data (run `make run` first) once per variant, with the
TF-IDF baseline alongside. Variants are *chosen* by validation macro-F1; test accuracy is
reported, never used to choose. Times are wall seconds on this machine and are only comparable
within one run (shared, noisy machines): the markdown also gives each variant's time relative
to the first. Writes benchmarks/results/train_cpu_defaults.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import pandas as pd

from flywheel.config import load_config
from flywheel.metrics import compute_metrics
from flywheel.models.bundle import ClassifierBundle, Preprocessing
from flywheel.tasks.baseline import fit_baseline
from flywheel.tasks.train import fit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = {
    "lr5e-5": {"lr": 5e-5},
    "lr1e-4": {"lr": 1e-4},
    "lr5e-5-batch16": {"lr": 5e-5, "batch_size": 16},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(VARIANTS), help="variants to run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    prepared = ROOT / "data" / "prepared"
    if not (prepared / "train.parquet").is_file():
        raise SystemExit("no prepared data: run `make run` first")
    train, val, test = (
        pd.read_parquet(prepared / f"{s}.parquet") for s in ("train", "val", "test")
    )
    summary = json.loads((prepared / "summary.json").read_text())  # recorded with the results
    base_cfg = load_config(ROOT / "params.yaml")
    rows = []

    started = time.perf_counter()
    baseline, chosen = fit_baseline(train, val, Preprocessing.of(base_cfg), base_cfg.seed)
    rows.append(
        _row(
            "tfidf-baseline",
            chosen,
            time.perf_counter() - started,
            None,
            compute_metrics(
                val["label"], baseline.predict_proba(val["text"].tolist()), baseline.labels
            ),
            compute_metrics(
                test["label"], baseline.predict_proba(test["text"].tolist()), baseline.labels
            ),
        )
    )

    for name in args.only or VARIANTS:
        settings = {f"train.{k}": v for k, v in VARIANTS[name].items()}
        cfg = load_config(
            ROOT / "params.yaml",
            {
                **settings,
                "train.checkpoint_dir": f"/tmp/flywheel-bench/{name}",
                "train.checkpoint_every_steps": 10_000,
            },
        )
        result = fit(cfg, train, val, f"bench-{name}")
        bundle = ClassifierBundle.load(result.model_dir)
        rows.append(
            _row(
                name,
                VARIANTS[name],
                result.seconds,
                result.samples_per_second,
                compute_metrics(
                    val["label"], bundle.predict_proba(val["text"].tolist()), bundle.labels
                ),
                compute_metrics(
                    test["label"], bundle.predict_proba(test["text"].tolist()), bundle.labels
                ),
            )
        )
        print(json.dumps(rows[-1]), flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": platform.platform(),
        "threads": base_cfg.train.threads,
        "rows": {"train": len(train), "val": len(val), "test": len(test)},
        "split_summary_rows": summary["rows_per_split"],
        "results": rows,
    }
    (RESULTS / "train_cpu_defaults.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "train_cpu_defaults.md").write_text(_markdown(rows))
    print(_markdown(rows))


def _row(name, settings, seconds, rate, val, test) -> dict:
    return {
        "variant": name,
        "settings": settings,
        "seconds": round(seconds, 1),
        "samples_per_second": round(rate, 1) if rate else None,
        "val_macro_f1": round(val.macro_f1, 4),
        "test_accuracy": round(test.accuracy, 4),
        "test_macro_f1": round(test.macro_f1, 4),
    }


def _markdown(rows: list[dict]) -> str:
    baseline = rows[0]["test_accuracy"]
    first = next((r["seconds"] for r in rows[1:]), None)
    header = [
        "variant",
        "settings",
        "val macro-F1 (chooses)",
        "test acc",
        "vs baseline",
        "time",
        "time vs first",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        delta = f"{100 * (r['test_accuracy'] - baseline):+.1f} pts" if r is not rows[0] else "-"
        relative = f"{r['seconds'] / first:.2f}x" if first and r is not rows[0] else "-"
        lines.append(
            f"| {r['variant']} | {r['settings']} | {r['val_macro_f1']:.4f} | "
            f"{r['test_accuracy']:.4f} | {delta} | {r['seconds']:.0f} s | {relative} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
