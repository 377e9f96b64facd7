"""Load and durability against the real `flywheel serve` on loopback (issue 18, point 4): mixed
valid and invalid predict and feedback requests at concurrency 8, 32 and 64 while the champion
is promoted and rolled back; 10,000 concurrent feedback writes, with repeated ids; a server
killed with SIGKILL in the middle of writes. Bounded in count and time; the server is stopped
by its own id. The two long tests (marked `long`: minutes) run with `make reliability`, not in
`make test`. The latency figures go to $FLYWHEEL_LOAD_REPORT (JSON, and a markdown table
beside it) when it is set (`make reliability` sets it: benchmarks/results/load.json)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from flywheel import feedback
from flywheel.promotion import rollback
from flywheel.registry import CHAMPION, PREVIOUS
from tests.reliability.conftest import serving
from tests.serving.conftest import exports, project  # noqa: F401 (fixtures)

LEVELS = (8, 32, 64)
REQUESTS_PER_LEVEL = 600  # bounded in count ...
DEADLINE_SECONDS = 240  # ... and in time, per level
FEEDBACK_WRITES = 10_000
REPEATS = 1_000  # of those ids, sent again at the same time


@dataclass
class Tally:
    """What came back: statuses by kind of request, latencies, failures."""

    statuses: dict[str, Counter] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)

    def add(self, kind: str, status: int, seconds: float) -> None:
        self.statuses.setdefault(kind, Counter())[status] += 1
        self.latencies.append(seconds)


def request_for(i: int) -> tuple[str, str, dict]:
    """The i-th request of the mix: kind, path and body. 45 % valid predictions, 15 % invalid
    ones, 30 % valid feedback, 10 % invalid feedback."""
    slot = i % 20
    if slot < 9:
        body = {"text": f"a moving film, number {i}"} if i % 2 else {"texts": [f"plot {i}", "ok"]}
        return "predict ok", "/predict", body
    if slot < 12:
        bad = [{"text": "   "}, {"text": 42}, {"texts": ["x"] * 500}][slot - 9]
        return "predict bad", "/predict", bad
    if slot < 18:
        return (
            "feedback ok",
            "/feedback",
            {"id": f"load-{i}", "text": f"review {i}", "label": "fresh"},
        )
    bad = [{"text": "fine", "label": "no such label"}, {"text": "", "label": "fresh"}][slot - 18]
    return "feedback bad", "/feedback", bad


async def drive(url: str, concurrency: int, count: int, tally: Tally, offset: int = 0) -> None:
    """`count` requests of the mix from `concurrency` clients at once."""
    queue = iter(range(offset, offset + count))
    deadline = time.monotonic() + DEADLINE_SECONDS

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in queue:
            if time.monotonic() > deadline:
                tally.failures.append("deadline")
                return
            kind, path, body = request_for(i)
            started = time.perf_counter()
            try:
                response = await client.post(path, json=body)
            except httpx.HTTPError as exc:
                tally.failures.append(f"{kind}: {exc!r} <- {exc.__cause__!r}")
                continue
            tally.add(kind, response.status_code, time.perf_counter() - started)
            if kind == "predict ok" and response.status_code == 200:
                tally.versions.append(response.json()["model_version"])
            if response.status_code >= 400 and not response.json().get("detail"):
                tally.failures.append(f"{kind}: {response.status_code} without a detail")

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {
        "p50_ms": at(0.50),
        "p95_ms": at(0.95),
        "p99_ms": at(0.99),
        "max_ms": ordered[-1] * 1000,
    }


async def level_with_moves(url: str, registry, level: int, tally: Tally, offset: int) -> None:
    """One level of the mixed load; at 32 clients the champion is promoted, then rolled back,
    while the requests go on (the registry calls run in a thread, off the clients' loop)."""
    load = asyncio.create_task(drive(url, level, REQUESTS_PER_LEVEL, tally, offset))
    if level == 32:
        await asyncio.sleep(1.0)
        moves = [(CHAMPION, "2"), (PREVIOUS, "1")]
        await asyncio.to_thread(registry.move, moves, "promote under load", "test")
        await asyncio.sleep(2.0)
        await asyncio.to_thread(rollback, registry, "roll back under load", "test")
    await load


@pytest.fixture
def served(project):  # noqa: F811
    with serving(project, 0.3) as server:
        yield server.spec.url, project[1], project[0], server


def feedback_store(root: Path) -> Path:
    return root / "data" / "feedback" / "feedback.db"


@pytest.mark.long
def test_mixed_load_at_8_32_64_clients_with_a_promotion_and_a_rollback(served):
    url, registry, root, _ = served
    report = {}
    offset = 0
    for level in LEVELS:
        tally = Tally()

        started = time.monotonic()
        asyncio.run(level_with_moves(url, registry, level, tally, offset))
        seconds = time.monotonic() - started
        offset += REQUESTS_PER_LEVEL
        log = (root / "serve.log").read_text()
        assert tally.failures == [], (level, len(tally.failures), tally.failures[:5], log[-3000:])
        assert sum(sum(kind.values()) for kind in tally.statuses.values()) == REQUESTS_PER_LEVEL
        statuses = {k: dict(v) for k, v in tally.statuses.items()}
        assert set(statuses["predict ok"]) == {200}, statuses
        assert set(statuses["feedback ok"]) == {201}, statuses
        assert all(400 <= s < 500 for s in statuses["predict bad"]), statuses
        assert all(400 <= s < 500 for s in statuses["feedback bad"]), statuses
        if level == 32:
            assert "2" in tally.versions, "the promotion was never served"
        report[f"c{level}"] = {
            "requests": sum(sum(kind.values()) for kind in tally.statuses.values()),
            "seconds": round(seconds, 2),
            "requests_per_s": round(REQUESTS_PER_LEVEL / seconds, 1),
            "statuses": statuses,
            **{k: round(v, 1) for k, v in percentiles(tally.latencies).items()},
        }
    print(json.dumps(report, indent=1))
    if os.environ.get("FLYWHEEL_LOAD_REPORT"):
        write_report(Path(os.environ["FLYWHEEL_LOAD_REPORT"]), report)
    log = (root / "serve.log").read_text()
    assert "Traceback" not in log


def write_report(path: Path, report: dict) -> None:
    """The figures as JSON and as a markdown table (path with .md)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "| clients | requests | seconds | requests/s | p50 ms | p95 ms | p99 ms | max ms | 5xx |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for level, r in report.items():
        errors = sum(n for kind in r["statuses"].values() for s, n in kind.items() if s >= 500)
        lines.append(
            f"| {level[1:]} | {r['requests']} | {r['seconds']} | {r['requests_per_s']} | "
            f"{r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['max_ms']} | {errors} |"
        )
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


async def write_feedback(url: str, ids: list[str], concurrency: int) -> tuple[Counter, list[str]]:
    """POST feedback for every id (text and label derived from it) from `concurrency` clients;
    (statuses and `created` flags, failures)."""
    outcome: Counter = Counter()
    failures: list[str] = []
    queue = iter(ids)

    async def client_loop(client: httpx.AsyncClient) -> None:
        for item in queue:
            body = {"id": item, "text": f"feedback text {item}", "label": "fresh"}
            try:
                response = await client.post("/feedback", json=body)
            except httpx.HTTPError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            created = response.json().get("created") if response.status_code < 300 else None
            outcome[(response.status_code, created)] += 1

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return outcome, failures


@pytest.mark.long
def test_10000_concurrent_feedback_writes_store_each_id_exactly_once(served):
    url, _, root, _ = served
    unique = [f"fb-{i}" for i in range(FEEDBACK_WRITES)]
    # Each repeated id is sent twice more, interleaved with the first sends, by other clients.
    ids = [item for i, item in enumerate(unique) for _ in range(3 if i < REPEATS else 1)]
    started = time.monotonic()
    outcome, failures = asyncio.run(write_feedback(url, ids, 32))
    seconds = time.monotonic() - started
    assert failures == []
    # A new row is a 201; an id already stored is a 200 that says nothing was created.
    assert outcome == {(201, True): FEEDBACK_WRITES, (200, False): 2 * REPEATS}, outcome
    rows = feedback.read(feedback_store(root))
    assert len(rows) == FEEDBACK_WRITES
    assert sorted(rows["id"]) == sorted(unique)
    assert rows["seq"].is_unique
    print(f"{len(ids):,} feedback requests from 32 clients in {seconds:.1f} s")


def test_acknowledged_feedback_survives_sigkill_in_the_middle_of_writes(served):
    url, _, root, server = served
    acknowledged: list[str] = []
    sent: list[str] = []

    async def writers() -> None:
        async def one(worker: int, client: httpx.AsyncClient) -> None:
            for i in range(10_000):
                item = f"kill-{worker}-{i}"
                sent.append(item)
                body = {"id": item, "text": f"text {worker} {i}", "label": "rotten"}
                try:
                    response = await client.post("/feedback", json=body)
                except httpx.HTTPError:
                    return  # the server is gone: this one was never acknowledged
                if response.status_code == 201:
                    acknowledged.append(item)

        async def kill_later() -> None:
            while len(acknowledged) < 300:
                await asyncio.sleep(0.01)
            os.killpg(server.pid, signal.SIGKILL)  # no shutdown, no flush: the process is gone

        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            await asyncio.gather(kill_later(), *(one(w, client) for w in range(16)))

    asyncio.run(writers())
    assert server.process.wait(timeout=30) == -signal.SIGKILL
    stored = set(feedback.read(feedback_store(root))["id"])
    lost = [item for item in acknowledged if item not in stored]
    assert lost == [], f"{len(lost)} acknowledged rows lost, e.g. {lost[:3]}"
    assert len(acknowledged) >= 300
    assert stored <= set(sent)  # nothing stored that was not sent
    print(
        f"killed after {len(acknowledged)} acknowledged writes; {len(stored)} stored "
        f"({len(stored) - len(acknowledged)} committed but unanswered), {len(sent)} sent"
    )
