"""`flywheel bench`: every performance measurement of Flywheel in one process, one results file.

    flywheel bench                # the full run (about an hour on 2 cores; needs `make run` first)
    flywheel bench --quick        # under 3 minutes: fewer texts, steps and requests (CI runs it)
    flywheel bench --only inference training

Sections (each also a script of its own in benchmarks/): `machine` (CPU model and flags,
cores, threads, versions), `inference` (engines at batch 1/8/64, latency, size, accuracy,
agreement: benchmarks/inference.py), `training` (fp32 vs bf16, unsorted vs length-grouped
batches: benchmarks/training.py), `serving` (the real `flywheel serve` under a bounded load:
benchmarks/serving.py; needs a champion in the registry, else recorded as skipped with why),
`scale` (training time and inference throughput against rows and sequence length, with a plot:
benchmarks/scale.py), `pipeline` (a first run of the whole pipeline on a throw-away copy of the
project, then cached re-runs: time per stage, orchestration and tracking overhead:
benchmarks/pipeline_cache.py; not with --quick, it is a whole run).
Variants are compared within this run (interleaved rounds after a warm-up; medians and p99),
since these machines are shared. Writes benchmarks/results/bench.json and bench.md (or
bench.quick.*), which README includes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SECTIONS = ("inference", "training", "serving", "scale", "pipeline")
FLAGS = (
    "avx2",
    "avx_vnni",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)

if str(ROOT / "benchmarks") not in sys.path:  # the sections are sibling scripts
    sys.path.insert(0, str(ROOT / "benchmarks"))


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU model and the flags that matter for int8 and bf16,
    cores, the load before the run, threads, versions."""
    from importlib.metadata import version

    cpu, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name":
                cpu = value
            elif key == "flags":
                flags = set(value.split())
    from flywheel.runtime import cpu_bf16_supported

    return {
        "cpu": cpu,
        "flags": [f for f in FLAGS if f in flags],
        "cores": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "native_bf16": cpu_bf16_supported(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("torch", "onnxruntime", "transformers", "flywheel")},
    }


def serving_section(quick: bool) -> dict[str, Any]:
    """benchmarks/serving.py against the champion, or why it could not run."""
    from flywheel import runtime
    from flywheel.config import load_config
    from flywheel.registry import ModelRegistry

    runtime.configure(ROOT)  # the project's MLflow store
    cfg = load_config(ROOT / "params.yaml")
    try:
        champion = ModelRegistry.of(cfg).aliases().get("champion")
    except Exception as error:  # no registry yet
        champion, why = None, f"no model registry ({type(error).__name__}: {error})"
    else:
        why = "no champion in the registry: run `make run` first"
    if champion is None:
        return {"skipped": why}
    import serving

    variants: dict[str, dict[str, Any]] = {
        "micro-batching on (default)": {},
        "micro-batching off": {"batch_wait_ms": 0},
    }
    if not quick:  # uvicorn's pure-Python parser, before httptools (--quick: under 3 minutes)
        variants["h11 HTTP parser"] = {"http": "h11"}
    return serving.run(quick=quick, variants=variants)


def run(quick: bool = False, only: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    """Every section asked for; the record `write` saves."""
    record: dict[str, Any] = {
        "benchmark": "flywheel bench",
        "quick": quick,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "seconds": {},
    }
    for section in (s for s in SECTIONS if s in only):  # pipeline last: it moves the stores
        started = time.perf_counter()
        print(f"bench: {section} ...", flush=True)
        if section == "inference":
            import inference

            record["inference"] = inference.run(quick=quick)
        elif section == "training":
            import training

            record["training"] = training.run(quick=quick)
        elif section == "serving":
            record["serving"] = serving_section(quick)
        elif section == "scale":
            import scale

            record["scale"] = scale.run(quick=quick)
        elif section == "pipeline":
            import pipeline_cache

            why = "a whole first run and three re-runs (about 10 min): not with --quick"
            record["pipeline"] = {"skipped": why} if quick else pipeline_cache.run()
        record["seconds"][section] = round(time.perf_counter() - started, 1)
    return record


def markdown(record: dict[str, Any], plot: str | None = None) -> str:
    m = record["machine"]
    lines = [
        "# `flywheel bench`" + (" --quick" if record["quick"] else ""),
        "",
        f"{m['cpu']}, {m['cores']} cores ({', '.join(m['flags']) or 'no AVX-512'}; native bf16: "
        f"{m['native_bf16']}), load {m['load_average_1m']} before the run; Python {m['python']}, "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f"; {record['date']}. Seconds per section: "
        + ", ".join(f"{k} {v:.0f}" for k, v in record["seconds"].items())
        + ".",
    ]
    if "inference" in record:
        import inference

        lines += ["", "## Inference", "", inference.markdown(record["inference"]).strip()]
    if "training" in record:
        import training

        body = training.markdown(record["training"]).split("\n", 2)[2]  # without its title
        lines += ["", "## Training", "", body.strip().replace("\n## ", "\n### ")]
    if "serving" in record:
        lines += ["", "## Serving"]
        serving_record = record["serving"]
        if "skipped" in serving_record:
            lines += ["", f"Skipped: {serving_record['skipped']}."]
        else:
            import serving

            lines += ["", serving.markdown(serving_record).split("\n", 2)[2].strip()]
    if "scale" in record:
        import scale

        body = scale.markdown(record["scale"], plot).split("\n", 2)[2]  # without its title
        lines += ["", "## Scale", "", body.strip().replace("\n## ", "\n### ")]
    if "pipeline" in record:
        lines += ["", "## Pipeline"]
        if "skipped" in record["pipeline"]:
            lines += ["", f"Skipped: {record['pipeline']['skipped']}."]
        else:
            import pipeline_cache

            body = pipeline_cache.markdown(record["pipeline"]).split("\n", 2)[2]
            lines += ["", body.strip().replace("\n## ", "\n### ")]
    return "\n".join(lines) + "\n"


def save(record: dict[str, Any], text: str, name: str, results: Path = RESULTS) -> Path:
    """A benchmark's record as `results/<name>.json` and its table as `<name>.md` (a quick run's
    as `<name>.quick.*`, which git ignores); the markdown's path."""
    name = f"{name}.quick" if record.get("quick") else name
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    path = results / f"{name}.md"
    path.write_text(text)
    return path


def write(record: dict[str, Any], results: Path = RESULTS) -> Path:
    """bench.{json,md} (bench.quick.* for a quick run) in `results`, and the scale section's
    plot beside them."""
    plot = None
    if "scale" in record:
        import scale

        name = "bench-scale.quick.png" if record["quick"] else "bench-scale.png"
        results.mkdir(parents=True, exist_ok=True)
        plot = scale.plot(record["scale"], results / name).name
    return save(record, markdown(record, plot), "bench", results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="flywheel bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="under 3 minutes (CI)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write")
    args = parser.parse_args(argv)
    record = run(args.quick, tuple(args.only))
    print(write(record, args.results).read_text())


if __name__ == "__main__":
    main()
