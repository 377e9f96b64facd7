"""`flywheel bench --quick` end to end: every section written, values sane (not particular
timings: these machines are shared)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

FLYWHEEL = Path(sys.executable).parent / "flywheel"


@pytest.mark.slow
def test_bench_quick_writes_every_section_with_sane_values(tmp_path):
    started = time.perf_counter()
    done = subprocess.run(
        [str(FLYWHEEL), "bench", "--quick", "--results", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "bench.quick.json").read_text())
    markdown = (tmp_path / "bench.quick.md").read_text()
    assert record["quick"] is True
    assert set(record["seconds"]) == {"inference", "training", "serving", "scale", "pipeline"}
    assert "not with --quick" in record["pipeline"]["skipped"]
    assert 0 < sum(record["seconds"].values()) <= seconds

    machine = record["machine"]
    assert machine["cpu"] and machine["cores"] >= 1
    assert {"torch", "onnxruntime", "transformers"} <= set(machine["versions"])
    assert isinstance(machine["native_bf16"], bool)

    inference = record["inference"]
    engines = {row["engine"]: row for row in inference["engines"]}
    assert {
        "pytorch fp32",
        "ort fp32 (raw export)",
        "ort fp32 (optimized)",
        "ort int8 plain",
        "ort int8 per-channel",
        "ort int8 static (calibrated)",
    } <= set(engines)
    for name, row in engines.items():
        assert all(row[f"texts_per_s_b{b}"] > 0 for b in (1, 8, 64)), name
        assert 0 < row["p50_ms"] <= row["p99_ms"], name
        # batch 1: texts/s and milliseconds per call describe the same calls
        assert 0.2 < row["texts_per_s_b1"] * row["p50_ms"] / 1000 < 5, name
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["macro_f1"] <= 1, name
        assert 0.5 <= row["agreement_vs_ort_fp32"] <= 1, name
        assert 0 <= row["margin_change_p50"] <= row["margin_change_p95"], name
        assert 0 <= row["texts_within_p95_change"] <= 1, name
    fp32 = engines["ort fp32 (optimized)"]
    assert fp32["agreement_vs_ort_fp32"] == 1.0
    assert fp32["margin_change_p95"] == 0.0  # fp32 against itself
    # int8 moves the margins more than fp32 engines differ from one another
    int8 = engines["ort int8 per-channel"]
    assert int8["margin_change_p95"] > engines["ort fp32 (raw export)"]["margin_change_p95"]
    assert engines["ort int8 per-channel"]["size_mb"] < fp32["size_mb"] / 2
    assert engines["pytorch fp32"]["size_mb"] > 10

    training = record["training"]["throughput"]
    skipped = record["training"]["skipped"]  # bf16 on a CPU without native bf16
    default = "bf16, fused AdamW, eager"
    assert set(training) | set(skipped) == {"fp32", default} and "fp32" in training
    for name, row in training.items():
        assert row["samples_per_second"] > 0 and row["peak_rss_mb"] > 100, name
        assert 0 <= row["padding_share"] < 1 and 0 <= row["pad_share"] < 1, name
    if default in training:  # the same seed cuts the same batches, whatever the precision
        assert training[default]["padding_share"] == training["fp32"]["padding_share"]

    serving = record["serving"]
    if "skipped" in serving:  # a fresh clone has no champion to serve
        assert "champion" in serving["skipped"] or "registry" in serving["skipped"]
        assert "Skipped:" in markdown
    else:
        for by_concurrency in serving["results"].values():
            for row in by_concurrency.values():
                assert row["rps"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
                assert row["errors"] == 0
    scale = record["scale"]
    assert [r["rows"] for r in scale["rows"]] == [128, 256]
    assert [r["max_length"] for r in scale["lengths"]] == [32, 64]
    for row in scale["rows"] + scale["lengths"]:
        assert row["train"]["seconds"] > 0 and row["train"]["samples_per_second"] > 0, row
        for engine in ("pytorch fp32", "onnx int8"):
            assert row[engine]["texts_per_second"] > 0 and row[engine]["seconds"] > 0, row
    # more rows take longer to train; the rate is a rate (texts over seconds)
    assert scale["rows"][1]["train"]["seconds"] > scale["rows"][0]["train"]["seconds"]
    first = scale["rows"][0]["onnx int8"]
    assert first["texts_per_second"] * first["seconds"] == pytest.approx(128)
    plot = tmp_path / "bench-scale.quick.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({plot.name})" in markdown

    for heading in ("## Inference", "## Training", "## Serving", "## Scale"):
        assert heading in markdown
