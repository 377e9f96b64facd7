"""Scale: how training time and inference throughput grow with rows and with sequence length.

    .venv/bin/python benchmarks/scale.py            # rows 1k/4k/12k, lengths 32-256 (~15 min)
    .venv/bin/python benchmarks/scale.py --quick    # rows 128/256, lengths 32/64 (~30 s)

Two axes, the default settings of params.yaml otherwise (bf16 where the CPU has it, batch 32):
- rows: one epoch of the default training (`fit`, validation and checkpoints included) on the
  first N rows of the default data (all its splits, shuffled: 12k is more than the training
  split), and scoring those N texts at batch 64 with PyTorch fp32 and the int8 ONNX model.
- sequence length: texts made long enough to fill `max_length` tokens (consecutive snippets
  joined), then one epoch on `--length-rows` of them and scoring `--length-texts` at batch 64,
  with `train.max_length` set to the length.
The int8 model is the newest run's (checkpoints/*/onnx/model.onnx, the export stage's choice);
before any run (a fresh clone, CI) the pinned base model exported and quantized per-channel,
with an untrained head: speeds are real, accuracies are not measured here anyway.
Writes benchmarks/results/scale.{json,md} and scale.png (scale.quick.* with --quick);
`flywheel bench` runs it as its `scale` section.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ROWS, LENGTHS = (1_000, 4_000, 12_000), (32, 64, 128, 256)
QUICK_ROWS, QUICK_LENGTHS = (128, 256), (32, 64)
BATCH = 64  # inference batch


def texts_and_labels() -> tuple[list[str], list[str]]:
    """The default data, every split (training.py's `splits`: the prepared data, or the embedded
    data before any run), shuffled."""
    import pandas as pd
    from training import splits  # a sibling script: benchmarks/ is on sys.path

    frame = pd.concat(splits()).sample(frac=1.0, random_state=0)
    return frame["text"].tolist(), frame["label"].tolist()


def filled(texts: list[str], labels: list[str], tokens: int, n: int, tokenizer: Any) -> tuple:
    """`n` texts of at least `tokens` tokens each: consecutive snippets joined (the label of
    the first), so a batch is all text and no padding."""
    out_texts, out_labels, i = [], [], 0
    for _ in range(n):
        parts, label = [], labels[i % len(texts)]
        while len(tokenizer(" ".join(parts))["input_ids"]) < tokens:
            parts.append(texts[i % len(texts)])
            i += 1
        out_texts.append(" ".join(parts))
        out_labels.append(label)
    return out_texts, out_labels


def engines(work: Path) -> tuple[Any, Any, str]:
    """PyTorch fp32 and the int8 ONNX model (see the module's docstring), and where from."""
    from inference import newest_run_dir  # a sibling script: benchmarks/ is on sys.path

    from flywheel.config import load_config
    from flywheel.models.bundle import ClassifierBundle, Preprocessing
    from flywheel.models.graph import export_fp32, quantize
    from flywheel.models.predictor import MODEL_FILE, OnnxPredictor
    from flywheel.tasks.export import copy_preprocessing

    run_dir = newest_run_dir()
    if run_dir is not None:
        bundle = ClassifierBundle.load(run_dir / "best")
        return bundle, OnnxPredictor(run_dir / "onnx", MODEL_FILE, threads=2), run_dir.name
    cfg = load_config(ROOT / "params.yaml")
    bundle = ClassifierBundle.from_base(
        cfg.train.base_model, ["fresh", "rotten"], Preprocessing.of(cfg)
    )
    bundle.save(work / "bundle")
    copy_preprocessing(work / "bundle", work / "onnx")
    raw = export_fp32(bundle, work / "raw.onnx", cfg.export.opset)
    int8 = quantize(raw, work / "int8.onnx", True)
    return bundle, OnnxPredictor(work / "onnx", int8, threads=2), "base model, untrained head"


def train_seconds(texts: list[str], labels: list[str], max_length: int, work: Path) -> dict:
    """One epoch of the default training on these texts (10 % of them, at least 32, validate):
    wall seconds and the loop's samples/s."""
    import pandas as pd

    from flywheel.config import load_config
    from flywheel.tasks.train import fit

    cfg = load_config(
        ROOT / "params.yaml",
        {"train.max_length": max_length, "train.checkpoint_dir": str(work / "checkpoints")},
    )
    frame = pd.DataFrame({"text": texts, "label": labels})
    val = frame.head(max(32, len(frame) // 10))
    started = time.perf_counter()
    result = fit(cfg, frame, val, f"scale-{len(texts)}-{max_length}.dir")
    return {
        "seconds": time.perf_counter() - started,
        "samples_per_second": result.samples_per_second,
        "device": result.device,
    }


def score_rate(engine: Any, texts: list[str], max_length: int) -> dict:
    """Scoring `texts` at batch 64 (tokenising included), after one warm-up batch."""
    engine.preprocessing = dataclasses.replace(engine.preprocessing, max_length=max_length)
    engine.logits(texts[:BATCH], BATCH)
    started = time.perf_counter()
    engine.logits(texts, BATCH)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "texts_per_second": len(texts) / seconds}


def run(quick: bool = False, length_rows: int = 1_000, length_texts: int = 512) -> dict:
    """Both axes; the record `write` saves."""
    from bench import machine  # a sibling script: benchmarks/ is on sys.path

    from flywheel import runtime

    runtime.set_threads(2)
    rows, lengths = (QUICK_ROWS, QUICK_LENGTHS) if quick else (ROWS, LENGTHS)
    if quick:
        length_rows, length_texts = 64, 64
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    texts, labels = texts_and_labels()
    pytorch, int8, origin = engines(work)
    default_length = pytorch.preprocessing.max_length
    by_rows, by_length = [], []
    for n in rows:
        if n > len(texts):
            by_rows.append({"rows": n, "skipped": f"the data has {len(texts):,} rows"})
            continue
        print(f"scale: {n:,} rows", flush=True)
        by_rows.append(
            {
                "rows": n,
                "train": train_seconds(texts[:n], labels[:n], default_length, work),
                "pytorch fp32": score_rate(pytorch, texts[:n], default_length),
                "onnx int8": score_rate(int8, texts[:n], default_length),
            }
        )
    need = max(length_rows, length_texts)
    for tokens in lengths:
        print(f"scale: {tokens} tokens", flush=True)
        long_texts, long_labels = filled(texts, labels, tokens, need, pytorch.tokenizer)
        by_length.append(
            {
                "max_length": tokens,
                "train": train_seconds(
                    long_texts[:length_rows], long_labels[:length_rows], tokens, work
                ),
                "pytorch fp32": score_rate(pytorch, long_texts[:length_texts], tokens),
                "onnx int8": score_rate(int8, long_texts[:length_texts], tokens),
            }
        )
    return {
        "benchmark": "scale",
        "quick": quick,
        "machine": machine(),
        "settings": {
            "default_max_length": default_length,
            "length_rows": length_rows,
            "length_texts": length_texts,
            "batch": BATCH,
            "int8_model": origin,
        },
        "rows": by_rows,
        "lengths": by_length,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def growth(points: list[tuple[float, float]]) -> str:
    """The log-log slope between the first and the last point: 1 = linear."""
    (x0, y0), (x1, y1) = points[0], points[-1]
    return f"{math.log(y1 / y0) / math.log(x1 / x0):.2f}" if len(points) > 1 else "-"


def markdown(record: dict[str, Any], plot: str | None = None) -> str:
    m, s = record["machine"], record["settings"]
    measured = [r for r in record["rows"] if "train" in r]
    lines = [
        "# Scale: rows and sequence length",
        "",
        f"{m['cpu']}, {m['cores']} cores; torch {m['versions']['torch']}, onnxruntime "
        f"{m['versions']['onnxruntime']}; {record['date']}. Int8 model: {s['int8_model']}. "
        "`.venv/bin/python benchmarks/scale.py`" + (" --quick" if record["quick"] else ""),
        "",
        f"## Rows (max_length {s['default_max_length']}, the default data)",
        "",
        "| rows | train s (one epoch) | train samples/s | PyTorch fp32 texts/s | "
        "int8 texts/s | int8 s for all rows |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['rows']:,} | skipped: {r['skipped']} | | | | |")
            continue
        lines.append(
            f"| {r['rows']:,} | {r['train']['seconds']:.1f} | "
            f"{r['train']['samples_per_second']:.1f} | "
            f"{r['pytorch fp32']['texts_per_second']:.0f} | "
            f"{r['onnx int8']['texts_per_second']:.0f} | {r['onnx int8']['seconds']:.1f} |"
        )
    lines += [
        "",
        "Growth exponent of training time in rows (log-log slope, first to last; 1 = linear): "
        + growth([(r["rows"], r["train"]["seconds"]) for r in measured])
        + ".",
        "",
        f"## Sequence length ({s['length_rows']:,} texts trained, {s['length_texts']:,} scored, "
        "every text filling max_length)",
        "",
        "| max_length | train s (one epoch) | train samples/s | PyTorch fp32 texts/s | "
        "int8 texts/s | int8 vs PyTorch |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["lengths"]:
        torch_rate, int8_rate = (r[k]["texts_per_second"] for k in ("pytorch fp32", "onnx int8"))
        lines.append(
            f"| {r['max_length']} | {r['train']['seconds']:.1f} | "
            f"{r['train']['samples_per_second']:.1f} | {torch_rate:.0f} | {int8_rate:.0f} | "
            f"{int8_rate / torch_rate:.2f}x |"
        )
    points = [(r["max_length"], r["train"]["seconds"]) for r in record["lengths"]]
    lines += [
        "",
        "Growth exponent of training time in max_length: " + growth(points) + "; of int8 "
        "scoring time: "
        + growth([(r["max_length"], r["onnx int8"]["seconds"]) for r in record["lengths"]])
        + ".",
    ]
    if plot:
        lines += ["", f"![scale]({plot})"]
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: Path) -> Path:
    """Four panels: training seconds and scoring texts/s, against rows and against length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in record["rows"] if "train" in r]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for column, (points, key, label) in enumerate(
        ((measured, "rows", "rows"), (record["lengths"], "max_length", "max_length (tokens)"))
    ):
        x = [r[key] for r in points]
        axes[0][column].plot(x, [r["train"]["seconds"] for r in points], "o-")
        axes[0][column].set_ylabel("training, one epoch (s)")
        for engine in ("pytorch fp32", "onnx int8"):
            rates = [r[engine]["texts_per_second"] for r in points]
            axes[1][column].plot(x, rates, "o-", label=engine)
        axes[1][column].set_ylabel("scoring, batch 64 (texts/s)")
        axes[1][column].legend()
        for row in (0, 1):
            axes[row][column].set_xlabel(label)
            axes[row][column].set_xscale("log", base=2)
            axes[row][column].grid(alpha=0.3)
    fig.suptitle(f"Flywheel scale ({record['machine']['cores']} cores, {record['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(record: dict[str, Any]) -> Path:
    from bench import save  # a sibling script: benchmarks/ is on sys.path

    name = "scale.quick" if record["quick"] else "scale"
    image = plot(record, RESULTS / f"{name}.png")
    return save(record, markdown(record, image.name), "scale", RESULTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="rows 128/256, lengths 32/64")
    parser.add_argument("--length-rows", type=int, default=1_000, help="texts trained per length")
    parser.add_argument("--length-texts", type=int, default=512, help="texts scored per length")
    args = parser.parse_args()
    print(write(run(args.quick, args.length_rows, args.length_texts)).read_text())


if __name__ == "__main__":
    main()
