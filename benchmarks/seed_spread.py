"""How much do trainings that differ only by seed differ? The evidence behind the promotion margins.

    .venv/bin/python benchmarks/seed_spread.py                 # seeds 42 1 2 (~20 min, 2 cores)
    .venv/bin/python benchmarks/seed_spread.py --seeds 42 1 2 3
    .venv/bin/python benchmarks/seed_spread.py --reuse   # the gates again on the last answers

Trains the default configuration (params.yaml) once per seed on the prepared default data (the
split is fixed: only the training seed changes), scores each model on the test split, and then
runs the promotion gates (flywheel/gates.py, with params.yaml's registry settings) on every
ordered pair of seeds: models that are equally good by construction. It reports the spread of
test accuracy and macro-F1, overall and per slice, and for each slice the largest loss the
95 % interval of a seed pair reaches: the margin at which equally good models still pass.
Writes benchmarks/results/seed_spread.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd

from flywheel import gates
from flywheel.config import load_config
from flywheel.models.bundle import ClassifierBundle
from flywheel.slices import slice_masks
from flywheel.tasks.train import fit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = Path("/tmp/flywheel-bench")


def prepared_splits() -> dict[str, pd.DataFrame]:
    """The prepared default data, made by the data stages when missing."""
    prepared = ROOT / "data" / "prepared"
    if not (prepared / "train.parquet").is_file():
        subprocess.run([str(ROOT / ".venv" / "bin" / "flywheel"), "run", "--data-only"], check=True)
    return {s: pd.read_parquet(prepared / f"{s}.parquet") for s in ("train", "val", "test")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    parser.add_argument(
        "--reuse",
        action="store_true",
        help=f"reuse each seed's answers and figures saved in {WORK} (no training): for a "
        "change of the gates or their settings",
    )
    args = parser.parse_args()
    if len(args.seeds) < 2:
        raise SystemExit("give at least two seeds")
    logging.basicConfig(level=logging.WARNING)
    splits = prepared_splits()
    test = splits["test"]
    masks = slice_masks(test)
    truth = test["label"].tolist()
    base = load_config(ROOT / "params.yaml")
    answers, runs = {}, []
    for seed in args.seeds:
        saved = WORK / f"run-{seed}.json"
        if args.reuse and saved.is_file():
            runs.append(json.loads(saved.read_text()))
            answers[seed] = json.loads((WORK / f"answers-{seed}.json").read_text())
            continue
        cfg = load_config(
            ROOT / "params.yaml",
            {
                "seed": seed,
                "train.checkpoint_dir": str(WORK / f"seed-{seed}"),
                "train.checkpoint_every_steps": 10_000,
            },
        )
        started = time.perf_counter()
        result = fit(cfg, splits["train"], splits["val"], f"seed-spread-{seed}")
        bundle = ClassifierBundle.load(result.model_dir)
        proba = bundle.predict_proba(test["text"].tolist())
        answers[seed] = list(np.asarray(bundle.labels)[proba.argmax(axis=1)])
        # each model against itself: its own scores, overall and per slice
        own = gates.compare(truth, answers[seed], answers[seed], masks, base.registry, 0)
        runs.append(
            {
                "seed": seed,
                "seconds": round(time.perf_counter() - started, 1),
                "best_val_macro_f1": round(result.best_val_macro_f1, 4),
                "scores": {f"{e.slice}|{e.metric}": round(e.candidate, 4) for e in own.estimates},
                "rows": {e.slice: e.rows for e in own.estimates},
            }
        )
        print(json.dumps(runs[-1]), flush=True)
        (WORK / f"answers-{seed}.json").write_text(json.dumps(answers[seed]))
        saved.write_text(json.dumps(runs[-1]))

    pairs = []
    for a, b in itertools.permutations(args.seeds, 2):
        paired = gates.compare(truth, answers[a], answers[b], masks, base.registry, base.seed)
        verdict = gates.judge(gates.Candidate(str(a), 1.0, 0.0), paired, base.registry)
        pairs.append(
            {
                "candidate": a,
                "champion": b,
                "passed": verdict.passed,
                "reasons": verdict.reasons,
                "discordant": list(paired.discordant),
                "estimates": [e.to_dict() for e in paired.estimates],
            }
        )
    record = {
        "machine": platform.platform(),
        "threads": base.train.threads,
        "settings": {"train": base.section("train"), "registry": base.section("registry")},
        "test_rows": len(test),
        "runs": runs,
        "pairs": pairs,
        "summary": summarise(runs, pairs),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "seed_spread.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "seed_spread.md").write_text(markdown(record))
    print(markdown(record))


def summarise(runs: list[dict], pairs: list[dict]) -> list[dict]:
    """Per slice and metric: the spread of the seeds' scores and the deepest interval end of a
    seed pair (the loss equally good models can show by chance)."""
    out = []
    for key in runs[0]["scores"]:
        slice_, metric = key.split("|")
        values = np.array([r["scores"][key] for r in runs])
        lows = [
            e["low"]
            for p in pairs
            for e in p["estimates"]
            if e["slice"] == slice_ and e["metric"] == metric
        ]
        mine = [e for p in pairs for e in p["estimates"] if e["slice"] == slice_]
        judged = any(e["verdict"] != gates.NOT_JUDGED for e in mine)
        out.append(
            {
                "slice": slice_,
                "metric": metric,
                "rows": runs[0]["rows"][slice_],
                "mean": round(float(values.mean()), 4),
                "std": round(float(values.std(ddof=1)), 4),
                "range": round(float(values.max() - values.min()), 4),
                "deepest_low": round(float(min(lows)), 4),
                "margin": mine[0]["margin"],
                "judged": judged,
            }
        )
    return out


def markdown(record: dict) -> str:
    lines = [
        f"Seeds {', '.join(str(r['seed']) for r in record['runs'])}; test split "
        f"{record['test_rows']:,} rows; default training settings.",
        "",
        "| slice | metric | rows | mean | std (seeds) | range | deepest 95 % low of a pair | "
        "margin | judged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in record["summary"]:
        lines.append(
            f"| {s['slice']} | {s['metric']} | {s['rows']:,} | {s['mean']:.4f} | "
            f"{100 * s['std']:.2f} pts | {100 * s['range']:.2f} pts | "
            f"{100 * s['deepest_low']:+.2f} pts | -{100 * s['margin']:.2f} pts | "
            f"{'yes' if s['judged'] else 'no'} |"
        )
    passed = sum(p["passed"] for p in record["pairs"])
    rc = record["settings"]["registry"]
    slices = rc["slice_margin"] if rc["slice_margin"] is not None else "scaled by sqrt(rows)"
    lines += [
        "",
        f"Seed pairs passing the gates (margin {rc['margin']:g}, slice margin {slices}): "
        f"{passed} of {len(record['pairs'])}.",
    ]
    for p in record["pairs"]:
        if not p["passed"]:
            lines.append(f"- {p['candidate']} vs {p['champion']}: {'; '.join(p['reasons'])}")
    lines.append(
        "\nTraining times: "
        + ", ".join(f"seed {r['seed']} {r['seconds']:.0f} s" for r in record["runs"])
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
