"""`flywheel bench`: the performance measurements of benchmarks/ in one command."""

from __future__ import annotations

import importlib.util
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from flywheel.cli.common import ParamsOption
from flywheel.config import DEFAULT_PARAMS


class Section(StrEnum):
    inference = "inference"
    training = "training"
    serving = "serving"
    scale = "scale"
    pipeline = "pipeline"


def bench(
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="Under 3 minutes: fewer texts, steps and requests (what CI runs)."
        ),
    ] = False,
    only: Annotated[
        list[Section] | None,
        typer.Option("--only", help="Run only this section (repeat for several)."),
    ] = None,
    results: Annotated[
        Path | None,
        typer.Option("--results", help="Folder for the results (default: benchmarks/results)."),
    ] = None,
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Measure inference, training, serving, scale and the pipeline on this machine.

    Inference: PyTorch fp32, ONNX Runtime fp32 (raw and fused) and int8 (plain, per-channel,
    the export's choice) at batch 1/8/64, latency p50/p99, size, accuracy, agreement. Training:
    fp32 vs bf16 autocast, dropout, fused AdamW, length-grouped batches, and (not with --quick)
    the default training with two seeds each. Serving: the real `flywheel serve` under a bounded
    load at concurrency 1, 8 and 32 (needs a champion: `make run` first). Scale: training time
    and inference throughput against rows (1k/4k/12k) and max length (32-256), with a plot.
    Pipeline (not with --quick): a first run of the whole pipeline on a throw-away copy, then
    cached re-runs: seconds per stage, orchestration and tracking overhead. Variants run in
    interleaved rounds in one process, so ratios hold on a busy machine. Writes
    benchmarks/results/bench.json, bench.md and bench-scale.png (bench.quick.* with --quick);
    the full run takes about an hour on 2 cores.
    """
    root = params.resolve().parent
    script = root / "benchmarks" / "bench.py"
    if not script.is_file():
        raise typer.BadParameter(
            f"{script} not found: `flywheel bench` runs the benchmarks of a Flywheel checkout "
            "(its folder holds params.yaml and benchmarks/); pass that checkout's --params",
            param_hint="--params",
        )
    spec = importlib.util.spec_from_file_location("flywheel_benchmarks_bench", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--quick"] if quick else []
    if only:
        argv += ["--only", *(section.value for section in only)]
    if results is not None:
        argv += ["--results", str(results)]
    module.main(argv)
