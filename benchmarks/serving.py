"""Serving end to end: the real `flywheel serve` on loopback under a bounded load.

    .venv/bin/python benchmarks/serving.py --note "otherwise idle"   # ~7 minutes on 2 cores
    .venv/bin/python benchmarks/serving.py --quick --no-write        # one round of 200 requests
    .venv/bin/python benchmarks/serving.py --wait-ms 0 0.5 2 5       # compare batching waits

Needs a finished `make run` (a champion in the project's MLflow registry). Each variant is one
`flywheel serve` process on a free 127.0.0.1 port (its own params file, its own prediction log
in a temporary folder), started before the load and stopped by its pid at the end, whatever
happens; the server of commit `BEFORE` (the code before the serving work measured here) runs
beside them. The load: a fixed number of POST /predict requests, one short real text each (test
split texts of at most 60 characters, in turn), sent by `concurrency` clients over keep-alive
connections, each sending its next request when its answer is in; a warm-up before each
measurement. Variants are measured in interleaved rounds (every variant at every concurrency
in each round), so a busy spell of the machine falls on all of them alike. Recorded besides
latency: the server's CPU time per request (/proc) and the texts per model call (/metrics).

The client is a minimal HTTP/1.1 client over asyncio streams, in this process: it costs ~0.2 ms
of CPU per request, far less than a general client, and the server shares the 2 cores with it.
`breakdown` times the model call in process and the answer of a text alone vs in a batch.
`run` returns the record (for a later `flywheel bench`); `main` writes
benchmarks/results/serving.{json,md} (`--name` for another name).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VENV_BIN = Path(sys.prefix) / "bin"
SHORT_CHARS = 60  # "short": test texts of at most this many characters
WARMUP = 64  # requests before each measurement


# --- the texts ---------------------------------------------------------------------------------


def short_texts(limit: int = SHORT_CHARS) -> tuple[list[str], str]:
    """Test-split texts of at most `limit` characters (data/prepared), else the vendored data's
    shortest; and where they came from."""
    import pandas as pd

    path = ROOT / "data" / "prepared" / "test.parquet"
    if path.is_file():
        texts = pd.read_parquet(path)["text"].astype(str).tolist()
        where = f"test split ({path.relative_to(ROOT)})"
    else:
        from flywheel.config import load_config
        from flywheel.sources import read_sources

        cfg = load_config(ROOT / "params.yaml")
        texts = read_sources(cfg.data, cfg.root)["text"].astype(str).tolist()
        where = "the vendored default data"
    short = [t for t in texts if 0 < len(t.strip()) <= limit]
    if not short:
        raise SystemExit(f"no text of at most {limit} characters in {where}")
    return short, f"{len(short)} texts of at most {limit} characters from {where}"


# --- the client --------------------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection: POST a JSON body, read the status and the body."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, f"{host}:{port}")

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split(b" ", 2)[1])
        length = None
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise ConnectionError("an answer without Content-Length")
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        with suppress(OSError):
            await self.writer.wait_closed()


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


async def _load(
    port: int, bodies: Sequence[bytes], requests: int, concurrency: int
) -> dict[str, Any]:
    connections = [
        await Connection.open("127.0.0.1", port) for _ in range(min(concurrency, requests))
    ]
    latencies: list[float] = []
    errors: list[str] = []
    issued = 0

    async def client(conn: Connection) -> None:
        nonlocal issued
        while issued < requests:
            body = bodies[issued % len(bodies)]
            issued += 1
            started = time.perf_counter()
            try:
                status, answer = await conn.post("/predict", body)
            except (OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            latencies.append(time.perf_counter() - started)
            if status != 200 or len(json.loads(answer)["predictions"]) != 1:
                errors.append(f"HTTP {status}: {answer[:200]!r}")

    started = time.perf_counter()
    try:
        await asyncio.gather(*(client(c) for c in connections))
    finally:
        wall = time.perf_counter() - started
        for conn in connections:
            await conn.close()
    ms = [s * 1000 for s in latencies]
    return {
        "requests": len(latencies),
        "seconds": wall,
        "rps": len(latencies) / wall if wall else 0.0,
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
        "errors": len(errors),
        "first_errors": errors[:3],
    }


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def model_calls(port: int) -> tuple[float, float] | None:
    """(model calls, texts scored) so far, from the server's /metrics; None if it has no such
    metric (a server from before it)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        for key in ("flywheel_model_call_texts_count", "flywheel_model_call_texts_sum"):
            if line.startswith(key + " "):
                values[key] = float(line.split()[-1])
    if len(values) < 2:
        return None
    return values["flywheel_model_call_texts_count"], values["flywheel_model_call_texts_sum"]


def load(
    port: int, texts: Sequence[str], requests: int, concurrency: int, pid: int | None = None
) -> dict[str, Any]:
    """`requests` POST /predict calls, `concurrency` at a time: requests/s, latency percentiles
    (ms), errors (a non-200 answer, or a connection lost), the CPU milliseconds per request of
    the server (process `pid`) and of this client, and the texts per model call."""
    bodies = [json.dumps({"text": t}).encode() for t in texts]
    calls_before = model_calls(port)
    server_before = cpu_seconds(pid) if pid else 0.0
    client_before = time.process_time()
    result = asyncio.run(_load(port, bodies, requests, concurrency))
    done = max(result["requests"], 1)
    result["client_cpu_ms"] = (time.process_time() - client_before) * 1000 / done
    if pid:
        result["server_cpu_ms"] = (cpu_seconds(pid) - server_before) * 1000 / done
    calls_after = model_calls(port)
    if calls_before and calls_after and calls_after[0] > calls_before[0]:
        calls = calls_after[0] - calls_before[0]
        result["texts_per_call"] = (calls_after[1] - calls_before[1]) / calls
    return result


# --- the servers -------------------------------------------------------------------------------


def variant_params(folder: Path, serve: dict[str, Any], params_text: str) -> Path:
    """A params file for one server: `params_text` (a params.yaml) with `serve` keys set and
    the prediction log and feedback store in `folder` (the project's own stay untouched)."""
    raw = yaml.safe_load(params_text)
    raw["serve"] = {**raw["serve"], **serve}
    raw["monitor"]["predictions_path"] = str(folder / "predictions.db")
    raw["data"]["feedback"]["path"] = str(folder / "feedback.db")
    # relative paths of the other sections are read against the project root
    for source in raw["data"].get("sources") or []:
        if isinstance(source, dict) and "path" in source and source["path"] != "embedded":
            source["path"] = str((ROOT / source["path"]).resolve())
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def server_spec(name: str, folder: Path, serve: dict[str, Any], code: Path | None) -> Any:
    """`flywheel serve` as a user starts it (default log level, the champion polled every
    serve.reload_seconds), on a free loopback port, with the project's registry; `code`: run
    another checkout's flywheel (an earlier commit) with this environment."""
    from flywheel import servers, tracking

    folder.mkdir(parents=True)
    params_text = (ROOT / "params.yaml").read_text(encoding="utf-8")
    if code is not None:  # that commit's params.yaml: it may not know today's keys
        params_text = (code / "params.yaml").read_text(encoding="utf-8")
    params = variant_params(folder, serve, params_text)
    port = servers.free_port()
    env = servers.base_env() | {"MLFLOW_TRACKING_URI": tracking.tracking_uri(ROOT)}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    url = f"http://{servers.HOST}:{port}"
    return servers.ServerSpec(
        name=f"flywheel serve ({name})",
        command=[str(VENV_BIN / "flywheel"), "serve", "--params", str(params), "--port", str(port)],
        env=env,
        url=url,
        health_url=f"{url}/health",
        log_path=folder / "serve.log",
        start_timeout=servers.SERVE_START_TIMEOUT,
    )


def checkout(ref: str, into: Path) -> Path:
    """The tree of git `ref` (flywheel/ and params.yaml) in `into`, for a server of that
    commit."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "flywheel", "params.yaml"],
        capture_output=True,
        check=True,
    )
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


# --- in process: where one request's time goes -------------------------------------------------


def _median_ms(fn: Any, items: Sequence[Any]) -> float:
    times = []
    for item in items:
        started = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def model_times(model: Any, sample: Sequence[str]) -> dict[str, Any]:
    """Median milliseconds of the parts of a single-text model call, and of the model call per
    text with 1 to 32 texts a call."""
    import numpy as np

    predictor = model.predictor
    tokenizer, prep = predictor.tokenizer, predictor.preprocessing
    encoded = [prep.encode(tokenizer, [t]) for t in sample]
    feeds = [predictor._feed(e, np.arange(1)) for e in encoded]
    parts = {
        "normalise + tokenise": _median_ms(lambda t: prep.encode(tokenizer, [t]), sample),
        "pad to arrays": _median_ms(lambda e: predictor._feed(e, np.arange(1)), encoded),
        "ONNX session.run": _median_ms(lambda f: predictor.session.run(None, f), feeds),
        "whole model call (ServedModel.predict)": _median_ms(lambda t: model.predict([t]), sample),
    }
    per_text = {}
    for size in (1, 4, 16, 32):
        groups = [
            [sample[(i * size + j) % len(sample)] for j in range(size)]
            for i in range(max(8, len(sample) // size))
        ]
        per_text[str(size)] = _median_ms(model.predict, groups) / size
    return {"parts_ms": parts, "per_text_ms_by_batch": per_text}


def breakdown(texts: Sequence[str], repeats: int = 300) -> dict[str, Any]:
    """The champion loaded as the server loads it, with one ONNX Runtime thread and with one per
    core: `model_times`, and how much a text's answer moves in a batch."""
    import numpy as np

    from flywheel.config import load_config
    from flywheel.registry import ModelRegistry
    from flywheel.serving.champion import RegistrySource

    cfg = load_config(ROOT / "params.yaml")
    registry = ModelRegistry.of(cfg)
    version = registry.alias("champion") or ""
    sample = [texts[i % len(texts)] for i in range(repeats)]
    out: dict[str, Any] = {"model_version": version}
    for label, threads in (("1 thread", 1), ("one per core", 0)):
        model = RegistrySource(registry, threads).load(version)
        out[label] = {"threads": threads, **model_times(model, sample)}
        out["variant"] = model.info.get("variant")
    # a text's answer alone vs in a model call with 15 other texts
    alone = np.array([model.predictor.predict_proba([t])[0] for t in texts])
    grouped = np.concatenate(
        [model.predictor.predict_proba(texts[i : i + 16]) for i in range(0, len(texts), 16)]
    )
    moved = np.abs(grouped - alone).max(axis=1)
    out["batch_vs_alone"] = {
        "texts": len(texts),
        "batch": 16,
        "max_abs_probability_difference": float(moved.max()),
        "mean_abs_probability_difference": float(moved.mean()),
        "labels_changed": int((grouped.argmax(axis=1) != alone.argmax(axis=1)).sum()),
    }
    return out


BEFORE = "5899baf"  # the last commit before this benchmark and the serving changes it measured
DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "batching off": {"batch_wait_ms": 0},
    "batching on (default)": {},
    "batching on, h11 parser": {"http": "h11"},
    "batching on, no spinning": {"spin_threads": False},
    "batching off, 1 thread": {"batch_wait_ms": 0, "threads": 1},
    "batching on, 1 thread": {"threads": 1},
}


def run(
    requests: int = 600,
    concurrencies: Sequence[int] = (1, 8, 32),
    quick: bool = False,
    rounds: int = 3,
    variants: dict[str, dict[str, Any]] | None = None,
    before: str | None = None,
) -> dict[str, Any]:
    """Every variant at every concurrency, in interleaved rounds; `before`: a git ref whose
    server is measured beside them (its own `serve` settings). Returns the record the
    results files are written from."""
    if quick:
        requests, rounds = min(requests, 200), 1
    variants = dict(DEFAULT_VARIANTS if variants is None else variants)
    texts, where = short_texts()
    from flywheel import servers

    with tempfile.TemporaryDirectory(prefix="flywheel-bench-serve-") as tmp, ExitStack() as stack:
        base = Path(tmp)
        specs: dict[str, Any] = {}
        if before:
            code = checkout(before, base / "before-code")
            label = f"before ({before})"
            specs[label] = server_spec("before", base / "before", {}, code)
        for i, (name, serve) in enumerate(variants.items()):
            specs[name] = server_spec(name, base / f"v{i}", serve, None)
        started = stack.enter_context(servers.running(list(specs.values())))
        ports = {name: int(spec.url.rsplit(":", 1)[1]) for name, spec in specs.items()}
        pids = {name: server.pid for name, server in zip(specs, started, strict=True)}
        per_round: dict[str, dict[int, list[dict[str, Any]]]] = {
            name: {c: [] for c in concurrencies} for name in specs
        }
        for r in range(rounds):
            order = list(specs) if r % 2 == 0 else list(reversed(specs))
            for name in order:
                for c in concurrencies:
                    load(ports[name], texts, WARMUP, c)
                    result = load(ports[name], texts, requests, c, pids[name])
                    per_round[name][c].append(result)
                    print(
                        f"round {r + 1} {name:<28} c={c:<3} {result['rps']:7.1f} req/s  "
                        f"p50 {result['p50_ms']:6.2f}  p99 {result['p99_ms']:6.2f} ms  "
                        f"server CPU {result['server_cpu_ms']:5.2f} ms/req  "
                        f"errors {result['errors']}",
                        flush=True,
                    )
        for name, server in zip(specs, started, strict=True):
            if server.exited() is not None:
                raise SystemExit(f"{name} exited during the run:\n{server.log_tail()}")
    table = {
        name: {str(c): summarise(rs) for c, rs in by_c.items()} for name, by_c in per_round.items()
    }
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "texts": where,
        "requests": requests,
        "warmup": WARMUP,
        "rounds": rounds,
        "concurrencies": list(concurrencies),
        "before": before,
        "variants": {name: variants.get(name, {}) for name in specs},
        "results": table,
    }


SUMMARY_KEYS = ("rps", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "server_cpu_ms", "client_cpu_ms")


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Across rounds: the median round's requests/s and latency percentiles; errors summed."""
    med = {key: statistics.median(r[key] for r in rounds) for key in SUMMARY_KEYS}
    per_call = [r["texts_per_call"] for r in rounds if "texts_per_call" in r]
    if per_call:
        med["texts_per_call"] = statistics.median(per_call)
    return {
        **{k: round(v, 2) for k, v in med.items()},
        "rps_rounds": [round(r["rps"], 1) for r in rounds],
        "errors": sum(r["errors"] for r in rounds),
        "first_errors": [e for r in rounds for e in r["first_errors"]][:3],
    }


def markdown(record: dict[str, Any]) -> str:
    from flywheel.tables import markdown_table

    rows = []
    for name, by_c in record["results"].items():
        for c, r in by_c.items():
            per_call = r.get("texts_per_call")
            rows.append(
                [
                    name,
                    c,
                    f"**{r['rps']:,.0f}**",
                    f"{r['p50_ms']:.2f}",
                    f"{r['p95_ms']:.2f}",
                    f"{r['p99_ms']:.2f}",
                    r["errors"],
                    f"{r['server_cpu_ms']:.2f}",
                    "–" if per_call is None else f"{per_call:.1f}",
                    ", ".join(f"{x:,.0f}" for x in r["rps_rounds"]),
                ]
            )
    header = [
        "server",
        "concurrency",
        "req/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "errors",
        "server CPU ms/req",
        "texts per model call",
        "req/s by round",
    ]

    def setting(name: str, serve: dict[str, Any]) -> str:
        if record.get("before") and name == f"before ({record['before']})":
            return "the code and params.yaml of that commit"
        return ", ".join(f"serve.{k}: {v}" for k, v in serve.items()) or "params.yaml as is"

    settings = "; ".join(f"{n}: {setting(n, v)}" for n, v in record["variants"].items())
    out = [
        "# Serving: `flywheel serve` under a bounded load",
        "",
        f"{record['machine']}{', ' + record['note'] if record.get('note') else ''}; "
        f"{record['texts']}, one per "
        f"request; {record['requests']} requests per measurement after {record['warmup']} "
        f"warm-up requests; the median of {record['rounds']} interleaved rounds. Server CPU: "
        "the server process's CPU time (all threads) per request. "
        "`.venv/bin/python benchmarks/serving.py`",
        "",
        markdown_table(header, rows),
        "",
        f"Settings: {settings}.",
    ]
    b = record.get("breakdown")
    if b:
        labels = [k for k in ("1 thread", "one per core") if k in b]
        part_rows = [
            [part, *(f"{b[k]['parts_ms'][part]:.2f}" for k in labels)]
            for part in b[labels[0]]["parts_ms"]
        ]
        part_rows += [
            [
                f"model call per text, {n} text{'s' if n != '1' else ''} a call",
                *(f"{b[k]['per_text_ms_by_batch'][n]:.2f}" for k in labels),
            ]
            for n in b[labels[0]]["per_text_ms_by_batch"]
        ]
        header = ["median ms", *(f"serve.threads: {b[k]['threads']} ({k})" for k in labels)]
        moved = b["batch_vs_alone"]
        out += [
            "",
            f"## Where a request's time goes: the model call in process (version "
            f"{b['model_version']}, {b['variant']})",
            "",
            markdown_table(header, part_rows),
            "",
            f"A text's answer scored alone vs in a call with {moved['batch'] - 1} other texts "
            f"({moved['texts']} texts): probabilities differ by up to "
            f"{moved['max_abs_probability_difference']:.3f} (mean "
            f"{moved['mean_abs_probability_difference']:.4f}); {moved['labels_changed']} labels "
            "change (an int8 model quantizes activations per call).",
        ]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round of 200 requests")
    parser.add_argument(
        "--before",
        default=BEFORE,
        help=f"git ref whose server is measured too ({BEFORE}; '': none)",
    )
    parser.add_argument(
        "--wait-ms", type=float, nargs="*", help="compare these serve.batch_wait_ms instead"
    )
    parser.add_argument("--note", default="", help="how busy the machine was, for the report")
    parser.add_argument(
        "--name", default="serving", help="results file name: benchmarks/results/NAME.{json,md}"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    variants = None
    if args.wait_ms:
        variants = {f"batch_wait_ms {w:g}": {"batch_wait_ms": w} for w in args.wait_ms}
    record = run(
        args.requests,
        quick=args.quick,
        rounds=args.rounds,
        variants=variants,
        before=args.before or None,
    )
    record["breakdown"] = breakdown(short_texts()[0])
    record["note"] = args.note
    text = markdown(record)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
        (RESULTS / f"{args.name}.md").write_text(text)


if __name__ == "__main__":
    main()
