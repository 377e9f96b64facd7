"""CPU training: fp32 vs bf16 autocast, dropout, the optimizer and attention kernels, and
length-grouped batches, in one run.

    .venv/bin/python benchmarks/training.py            # throughput + 2 seeds of full training
    .venv/bin/python benchmarks/training.py --quick    # throughput of fp32 and the default only

Needs the prepared default data (`make run` first). Two parts, each variant in a process of
its own (so peak memory is the variant's, and one variant's allocator state does not help the
next):
- throughput: `--steps` optimizer steps of the default training per variant (after 5 untimed
  warm-up steps), interleaved over `--rounds` rounds, the median round: samples/s, and the
  shares of the time spent tokenising and padding; plus the max-length / batch-size trade-off
  for the default precision.
- full training (not with --quick): the default training (params.yaml, one epoch) in fp32
  with the code before issue 17 and today's default (bf16 autocast, fused AdamW, eager
  attention), each seed interleaved: wall seconds, peak memory, test accuracy and macro-F1 of
  the best checkpoint. "fp32" and "bf16" run the code before decision 0017 (`before_0017`):
  what the project shipped before. The full runs of the other variants are in
  benchmarks/results/training.0017.md (decisions 0016, 0017).
Ratios are within this run (shared, noisy machines). Writes benchmarks/results/training.{json,md}
(or training.quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PREPARED = ROOT / "data" / "prepared"

# name -> train settings over params.yaml
VARIANTS = {
    "fp32": {"precision": "fp32", "group_by_length": False, "dropout": None},  # before issue 17
    "bf16": {"precision": "bf16", "group_by_length": False, "dropout": None},  # before 0017
    "bf16, fused AdamW, eager": {"precision": "bf16", "group_by_length": False, "dropout": None},
    "bf16, dropout 0": {"precision": "bf16", "group_by_length": False, "dropout": 0.0},
    "bf16, dropout 0, grouped": {"precision": "bf16", "group_by_length": True, "dropout": 0.0},
}
# Variants run with the training code as it was before decision 0017 (AdamW one tensor at a
# time, torch's sdpa attention): what the project shipped before.
BEFORE_0017 = {"fp32", "bf16"}
# before issue 17; the default on a CPU with native bf16 (dropout: the base model's)
BEFORE, AFTER = "fp32", "bf16, fused AdamW, eager"
FULL = (BEFORE, AFTER)  # trained to the end, per seed (the rest: decisions 0016, 0017)
SHAPES = [(32, 32), (64, 16), (64, 32), (64, 64), (128, 32)]  # (max_length, batch_size)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process: `spec["mode"]` is "steps" or "full"."""
    import torch

    from flywheel.config import load_config
    from flywheel.metrics import label_ids, label_scores
    from flywheel.models.bundle import ClassifierBundle
    from flywheel.runtime import select_device
    from flywheel.tasks import train as stage

    if spec.get("before_0017"):
        before_0017(stage)
    overrides = {f"train.{k}": v for k, v in spec["train"].items()}
    overrides["seed"] = spec.get("seed", 42)
    overrides["train.checkpoint_dir"] = spec["checkpoints"]
    cfg = load_config(ROOT / "params.yaml", overrides)
    tc = cfg.train
    train, val, test = splits()
    device = select_device(tc.device, tc.precision)
    if spec["mode"] == "full":
        started = time.perf_counter()
        result = stage.fit(cfg, train, val, "bench.dir", device=device)
        seconds = time.perf_counter() - started
        bundle = ClassifierBundle.load(result.model_dir)
        labels = bundle.labels
        predicted = bundle.logits(test["text"].tolist()).argmax(axis=1)
        accuracy, f1 = label_scores(
            label_ids(test["label"].tolist(), labels), predicted, len(labels)
        )
        return {
            "seconds": seconds,
            "train_seconds": result.seconds,
            "samples_per_second": result.samples_per_second,
            "steps": result.steps,
            "test_accuracy": accuracy,
            "test_macro_f1": f1,
            "best_val_macro_f1": result.best_val_macro_f1,
            "peak_rss_mb": peak_rss_mb(),
            "device": str(device),
        }
    # steps: the training loop's own pieces, timed
    torch.set_num_threads(tc.threads or torch.get_num_threads())
    torch.manual_seed(cfg.seed)
    labels = sorted(set(train["label"]))
    bundle = stage.ClassifierBundle.from_base(tc.base_model, labels, stage.Preprocessing.of(cfg))
    texts = train["text"].tolist()[: tc.batch_size * (spec["steps"] + 5)]
    started = time.perf_counter()
    rows = stage._rows(bundle, train.head(len(texts)), labels)
    tokenise = time.perf_counter() - started
    lengths = [len(r["input_ids"]) for r in rows]
    batches = stage.epoch_batches(lengths, tc.batch_size, cfg.seed, tc.group_by_length)
    model = bundle.model.train()
    stage._for_training(model, device, tc.dropout)
    opt = stage.Optimization.of(model, tc, len(batches), device)
    dtype = getattr(torch, device.autocast_dtype) if device.autocast_dtype else None
    pad_seconds = step_seconds = 0.0
    samples = tokens = padded = 0
    for index, ids in enumerate(batches[: spec["steps"] + 5]):
        t0 = time.perf_counter()
        batch = bundle.pad([rows[i] for i in ids])
        t1 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        opt.step(model, tc.max_grad_norm)
        t2 = time.perf_counter()
        if index >= 5:  # warm-up steps are not timed
            pad_seconds += t1 - t0
            step_seconds += t2 - t1
            samples += len(ids)
            tokens += sum(lengths[i] for i in ids)
            padded += batch["input_ids"].numel()
    return {
        "samples_per_second": samples / (pad_seconds + step_seconds),
        "tokenise_ms_per_text": 1000 * tokenise / len(texts),
        "pad_share": pad_seconds / (pad_seconds + step_seconds),
        "padding_share": 1 - tokens / padded,  # positions of the batches that are padding
        "peak_rss_mb": peak_rss_mb(),
        "device": str(device),
    }


def before_0017(stage: Any) -> None:
    """The training code before decision 0017, in this process: AdamW without `fused`, and the
    model's own attention (sdpa) instead of the eager one on CPU; dropout stays a setting."""
    import torch

    adamw = torch.optim.AdamW

    def unfused(*args: Any, fused: bool | None = None, **kwargs: Any) -> Any:
        return adamw(*args, **kwargs)

    def dropout_only(model: Any, device: Any, dropout: float | None) -> None:
        if dropout is not None:
            stage.set_dropout(model, dropout)

    torch.optim.AdamW = unfused
    stage._for_training = dropout_only


def splits() -> tuple[Any, Any, Any]:
    """train, val, test: the prepared default data, or before any run (a fresh clone, CI) the
    embedded data cut 80/10/10 in its file order (throughput needs texts, not a fair split)."""
    import pandas as pd

    if (PREPARED / "train.parquet").is_file():
        return tuple(pd.read_parquet(PREPARED / f"{s}.parquet") for s in ("train", "val", "test"))
    from flywheel.config import EmbeddedSource
    from flywheel.sources import read_embedded

    frame = read_embedded(EmbeddedSource(kind="embedded")).sample(frac=1.0, random_state=0)
    cut = [int(len(frame) * share) for share in (0.8, 0.9)]
    return frame.iloc[: cut[0]], frame.iloc[cut[0] : cut[1]], frame.iloc[cut[1] :]


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_child(spec: dict[str, Any]) -> dict[str, Any]:
    """`child(spec)` in a new Python process; its JSON answer."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    if done.returncode:
        raise RuntimeError(f"benchmark child failed: {spec}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool = False, steps: int = 25, rounds: int = 2, seeds: int = 2) -> dict[str, Any]:
    """Every measurement; the record `write` saves."""
    from bench import machine  # a sibling script: benchmarks/ is on sys.path

    if not quick and not (PREPARED / "train.parquet").is_file():
        raise SystemExit("no prepared data: run `make run` first (or use --quick)")
    if quick:
        steps, rounds, seeds = 10, 1, 0
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    from flywheel.runtime import cpu_bf16_supported

    variants = {k: VARIANTS[k] for k in (BEFORE, AFTER)} if quick else dict(VARIANTS)
    skipped = {}
    if not cpu_bf16_supported():  # bf16 would be refused (emulated, slower than fp32)
        skipped = {k: "no native bf16 on this CPU" for k, v in variants.items() if "bf16" in k}
        variants = {k: v for k, v in variants.items() if k not in skipped}
    throughput: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    shapes: dict[str, list[dict[str, Any]]] = {f"{m}x{b}": [] for m, b in SHAPES}
    for round_ in range(rounds):
        for name, settings in variants.items():
            spec = {
                "mode": "steps",
                "steps": steps,
                "train": settings,
                "checkpoints": str(work),
                "before_0017": name in BEFORE_0017,
            }
            throughput[name].append(in_child(spec))
        if not quick and round_ == 0 and not skipped:  # one round: a trade-off
            for max_length, batch in SHAPES:
                settings = {
                    **VARIANTS["bf16, dropout 0, grouped"],
                    "max_length": max_length,
                    "batch_size": batch,
                }
                spec = {
                    "mode": "steps",
                    "steps": steps,
                    "train": settings,
                    "checkpoints": str(work),
                }
                shapes[f"{max_length}x{batch}"].append(in_child(spec))
    full: dict[str, list[dict[str, Any]]] = {name: [] for name in FULL if name not in skipped}
    for seed in range(seeds):
        for name in full:
            spec = {
                "mode": "full",
                "seed": 42 + seed,
                "train": VARIANTS[name],
                "checkpoints": str(work / f"{seed}-{name}"),
                "before_0017": name in BEFORE_0017,
            }
            full[name].append({"seed": 42 + seed, **in_child(spec)})
    return {
        "benchmark": "training",
        "quick": quick,
        "machine": machine(),  # bench.py's: one description of the machine for every section
        "settings": {
            "steps": steps,
            "rounds": rounds,
            "seeds": seeds,
            "variants": VARIANTS,
            "before_0017": sorted(BEFORE_0017),
        },
        "throughput": {name: median_round(r) for name, r in throughput.items()},
        "skipped": skipped,
        "shapes": {name: median_round(r) for name, r in shapes.items() if r},
        "full": full,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the (lower) median samples/s, and every round's samples/s."""
    ordered = sorted(rounds, key=lambda r: r["samples_per_second"])
    middle = ordered[(len(ordered) - 1) // 2]
    return {**middle, "rounds": [round(r["samples_per_second"], 1) for r in rounds]}


def markdown(record: dict[str, Any]) -> str:
    m = record["machine"]
    lines = [
        "# Training on CPU: fp32 vs bf16, dropout, fused AdamW + eager attention, grouped batches",
        "",
        f"{m['cpu']}, {m['cores']} cores, flags {', '.join(m['flags'])}; native bf16: "
        f"{m['native_bf16']}; torch {m['versions']['torch']}, Python {m['python']}; "
        f"{record['date']}. "
        "`.venv/bin/python benchmarks/training.py`" + (" --quick" if record["quick"] else ""),
        "",
        f"## Throughput: {record['settings']['steps']} steps of the default training per "
        f"variant, median of {record['settings']['rounds']} interleaved rounds",
        "",
        f"{', '.join(record['settings'].get('before_0017', []))}: the training code before "
        "decision 0017 (AdamW one tensor at a time, sdpa attention, dropout 0.1).",
        "",
        "| variant | samples/s | vs fp32 | padding share | pad time share | peak MB | by round |",
        "|---|---|---|---|---|---|---|",
    ]
    base = record["throughput"][BEFORE]["samples_per_second"]
    for name, r in record["throughput"].items():
        lines.append(
            f"| {name} | {r['samples_per_second']:.1f} | {r['samples_per_second'] / base:.2f}x | "
            f"{r['padding_share']:.0%} | {r['pad_share']:.1%} | {r['peak_rss_mb']:.0f} | "
            f"{', '.join(map(str, r['rounds']))} |"
        )
    for name, why in record.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: {why} | | | | | |")
    tokenise = statistics.median(r["tokenise_ms_per_text"] for r in record["throughput"].values())
    lines += ["", f"Tokenising (once per run, before the loop): {tokenise:.3f} ms per text."]
    if record["shapes"]:
        lines += [
            "",
            "## Max length x batch size (bf16, dropout 0, grouped, one round)",
            "",
            "| max_length x batch | samples/s | padding share |",
            "|---|---|---|",
        ]
        for name, r in record["shapes"].items():
            lines.append(f"| {name} | {r['samples_per_second']:.1f} | {r['padding_share']:.0%} |")
    if any(record["full"].values()):
        lines += [
            "",
            "## The default training (one epoch), per seed",
            "",
            "| variant | seed | wall s | samples/s | peak MB | test accuracy | test macro-F1 |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, runs in record["full"].items():
            for r in runs:
                lines.append(
                    f"| {name} | {r['seed']} | {r['seconds']:.0f} | {r['samples_per_second']:.1f}"
                    f" | {r['peak_rss_mb']:.0f} | {r['test_accuracy']:.4f} | "
                    f"{r['test_macro_f1']:.4f} |"
                )
        lines.append("")
        for name in FULL[1:]:
            if record["full"].get(name) and record["full"].get(BEFORE):
                before, after = (record["full"][k] for k in (BEFORE, name))
                ratio = statistics.mean(
                    b["seconds"] / a["seconds"] for a, b in zip(after, before, strict=True)
                )
                lines.append(f"{name} vs {BEFORE}, full training: {ratio:.2f}x faster (seed mean).")
    return "\n".join(lines) + "\n"


def write(record: dict[str, Any]) -> Path:
    from bench import save  # a sibling script: benchmarks/ is on sys.path

    return save(record, markdown(record), "training", RESULTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="throughput only, 10 steps, 1 round")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=2, help="full trainings per variant")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    record = run(args.quick, args.steps, args.rounds, args.seeds)
    print(write(record).read_text())


if __name__ == "__main__":
    main()
