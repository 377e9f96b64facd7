"""PyTorch fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8: size, speed and parity, in one run.

    .venv/bin/python benchmarks/export_int8.py                 # newest export under checkpoints/
    .venv/bin/python benchmarks/export_int8.py --run-dir checkpoints/1d26043adf94

Needs a finished `make run` (a fine-tuned bundle in <run>/best and its export in <run>/onnx).
Scores the test split with each engine in interleaved rounds (the median round counts; texts
sorted by length for all engines alike), times single texts as a served request would see them,
and adds plain whole-model int8 as a reference for what the export's search buys. Speeds are
compared as ratios within this run (shared, noisy machines).
Writes benchmarks/results/export_int8.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from flywheel import runtime
from flywheel.config import load_config
from flywheel.metrics import compute_metrics
from flywheel.models.bundle import ClassifierBundle, softmax
from flywheel.models.graph import measure_latency, quantize
from flywheel.models.predictor import MODEL_FILE, OnnxPredictor

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def newest_run_dir() -> Path:
    found = sorted(ROOT.glob("checkpoints/*/onnx/parity.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit("no export under checkpoints/: run `make run` first")
    return found[-1].parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="checkpoints/<run key> (default: newest)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved scoring rounds")
    parser.add_argument("--latency-texts", type=int, default=200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    runtime.configure(ROOT)
    cfg = load_config(ROOT / "params.yaml")
    threads = runtime.set_threads(cfg.train.threads)
    run_dir = (args.run_dir or newest_run_dir()).resolve()
    onnx_dir = run_dir / "onnx"
    parity = json.loads((onnx_dir / "parity.json").read_text())
    test = pd.read_parquet(cfg.resolve(cfg.split.prepared_dir) / "test.parquet")
    # Sorted by length for every engine alike (the ONNX predictor sorts, the PyTorch bundle
    # does not): batches then pad to similar lengths, and the comparison is of engines only.
    test = test.iloc[np.argsort(test["text"].str.len().to_numpy(), kind="stable")]
    texts, truth = test["text"].tolist(), test["label"].tolist()

    with tempfile.TemporaryDirectory() as tmp:
        plain = quantize(onnx_dir / "fp32.onnx", Path(tmp) / "plain-int8.onnx", per_channel=False)
        engines = {
            "pytorch-fp32": ClassifierBundle.load(run_dir / "best"),
            "onnxruntime-fp32": OnnxPredictor(onnx_dir, "fp32.onnx", threads=threads),
            f"onnxruntime-{parity['chosen']}": OnnxPredictor(onnx_dir, threads=threads),
            "onnxruntime-int8-plain": OnnxPredictor(onnx_dir, plain, threads=threads),
        }
        sizes = {
            "pytorch-fp32": (run_dir / "best" / "model.safetensors").stat().st_size,
            "onnxruntime-fp32": (onnx_dir / "fp32.onnx").stat().st_size,
            f"onnxruntime-{parity['chosen']}": (onnx_dir / MODEL_FILE).stat().st_size,
            "onnxruntime-int8-plain": plain.stat().st_size,
        }
        seconds: dict[str, list[float]] = {name: [] for name in engines}
        logits: dict[str, np.ndarray] = {}
        for _ in range(args.rounds):
            for name, engine in engines.items():
                started = time.perf_counter()
                logits[name] = engine.logits(texts)
                seconds[name].append(time.perf_counter() - started)
        sample = texts[: args.latency_texts]
        latency = {name: measure_latency(engine, sample) for name, engine in engines.items()}

    labels = engines["onnxruntime-fp32"].labels
    reference, fp32 = logits["pytorch-fp32"], logits["onnxruntime-fp32"]
    rows = []
    for name in engines:
        median = statistics.median(seconds[name])
        metrics = compute_metrics(truth, softmax(logits[name]), labels)
        rows.append(
            {
                "engine": name,
                "size_mb": round(sizes[name] / 1e6, 1),
                "texts_per_second": round(len(texts) / median, 1),
                "p50_ms": round(latency[name].p50_ms, 2),
                "p95_ms": round(latency[name].p95_ms, 2),
                "test_accuracy": round(metrics.accuracy, 4),
                "test_macro_f1": round(metrics.macro_f1, 4),
                "max_logit_diff_vs_pytorch": float(np.abs(logits[name] - reference).max()),
                "agreement_vs_onnx_fp32": round(
                    float((logits[name].argmax(1) == fp32.argmax(1)).mean()), 4
                ),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    first = rows[0]
    for row in rows:
        row["speed_vs_pytorch"] = round(row["texts_per_second"] / first["texts_per_second"], 2)
        row["p95_vs_pytorch"] = round(row["p95_ms"] / first["p95_ms"], 2)

    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": platform.platform(),
        "threads": threads,
        "run_dir": run_dir.name,
        "chosen": parity["chosen"],
        "kept_fp32": next(
            (c["keep_fp32"] for c in parity["candidates"] if c["name"] == parity["chosen"]), []
        ),
        "test_rows": len(texts),
        "rounds": args.rounds,
        "results": rows,
    }
    (RESULTS / "export_int8.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "export_int8.md").write_text(markdown(record))
    print(markdown(record))


def markdown(record: dict) -> str:
    header = [
        "engine",
        "size MB",
        "texts/s (test, batch 64)",
        "vs PyTorch",
        "p50 ms",
        "p95 ms",
        "test acc",
        "test macro-F1",
        "agreement vs ORT fp32",
        "max |logit diff| vs PyTorch",
    ]
    lines = [
        f"Test split ({record['test_rows']} texts), {record['threads']} threads, median of "
        f"{record['rounds']} interleaved rounds; single-text latency over 200 texts. Chosen "
        f"export: `{record['chosen']}` (fp32 groups: {', '.join(record['kept_fp32']) or 'none'}).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in record["results"]:
        cells = [
            r["engine"],
            f"{r['size_mb']:.1f}",
            f"{r['texts_per_second']:.0f}",
            f"{r['speed_vs_pytorch']:.2f}x",
            f"{r['p50_ms']:.1f}",
            f"{r['p95_ms']:.1f}",
            f"{r['test_accuracy']:.4f}",
            f"{r['test_macro_f1']:.4f}",
            f"{100 * r['agreement_vs_onnx_fp32']:.2f} %",
            f"{r['max_logit_diff_vs_pytorch']:.2e}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
