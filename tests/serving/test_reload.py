"""`flywheel serve` as a real process on a free loopback port, reading a real MLflow registry:
the champion moves (a promotion, then a rollback) under a bounded concurrent load and no
request fails; concurrent feedback writes lose no row. The server is stopped by its own id."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from flywheel import feedback, servers
from flywheel.promotion import rollback
from flywheel.registry import CHAMPION, PREVIOUS
from flywheel.servers import free_port

TOKEN = "test-token"
WORKERS = 4
MAX_REQUESTS = 400  # per worker: the load is bounded in count ...
DEADLINE_SECONDS = 120  # ... and in time


@pytest.fixture
def server(project):
    """`flywheel serve` on a free port with a token; stopped (by its pid) whatever happens."""
    root, registry = project
    env = {"FLYWHEEL_API_TOKEN": TOKEN, "MLFLOW_TRACKING_URI": registry.uri}
    spec = servers.serve_spec(root / "params.yaml", free_port(), 0.3, root / "serve.log", env)
    with servers.running([spec]):
        yield spec.url, registry, root


def changes(versions: list[str | None]) -> list[str | None]:
    """The versions in the order they were served, repeats collapsed."""
    return [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]]


def test_the_champion_moves_under_load_and_no_request_fails(server):
    url, registry, _ = server
    stop = threading.Event()
    results: list[list[tuple[int, str | None]]] = [[] for _ in range(WORKERS)]
    errors: list[str] = []

    def load(worker: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            for i in range(MAX_REQUESTS):
                if stop.is_set():
                    return
                try:
                    r = client.post("/predict", json={"texts": [f"worker {worker} text {i}"] * 2})
                    version = r.json().get("model_version") if r.status_code == 200 else None
                    results[worker].append((r.status_code, version))
                except Exception as exc:  # a dropped connection is a failed request too
                    errors.append(f"{type(exc).__name__}: {exc}")

    def wait_for(version: str) -> None:
        """Until a worker is answered by `version` in a request it sends from now on."""
        marks = [len(rs) for rs in results]
        deadline = time.monotonic() + 60
        while not any(
            v == version for rs, m in zip(results, marks, strict=True) for _, v in rs[m:]
        ):
            assert time.monotonic() < deadline, f"version {version} never served"
            time.sleep(0.1)

    threads = [threading.Thread(target=load, args=(w,)) for w in range(WORKERS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    try:
        while sum(map(len, results)) < 40:  # traffic on version 1 first
            time.sleep(0.05)
        registry.move([(CHAMPION, "2"), (PREVIOUS, "1")], "promote under load", "test")
        wait_for("2")
        rollback(registry, "roll back under load", "test")  # what `flywheel models rollback` does
        wait_for("1")
        time.sleep(0.5)  # some traffic after the rollback
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=DEADLINE_SECONDS)
    assert time.monotonic() - started < DEADLINE_SECONDS
    assert errors == []
    statuses = [s for rs in results for s, _ in rs]
    assert statuses and set(statuses) == {200}, f"{len(statuses)} requests"
    phases = [changes([v for _, v in rs]) for rs in results]
    # each client saw 1, then 2, then 1 again (or part of it): one swap each way, no flapping
    assert all(p in (["1", "2", "1"], ["1", "2"], ["2", "1"], ["1"], ["2"]) for p in phases), phases
    assert ["1", "2", "1"] in phases, phases
    metrics = httpx.get(f"{url}/metrics").text
    assert 'flywheel_model_reloads_total{result="swapped"} 2.0' in metrics
    assert httpx.get(f"{url}/model").json()["version"] == "1"


def test_concurrent_feedback_writes_lose_no_row(server):
    url, _, root = server
    auth = {"Authorization": f"Bearer {TOKEN}"}
    statuses: list[int] = []

    def send(worker: int) -> None:
        with httpx.Client(base_url=url, headers=auth, timeout=30) as client:
            for i in range(25):
                payload = {"id": f"w{worker}-{i}", "text": f"text {worker} {i}", "label": "fresh"}
                statuses.append(client.post("/feedback", json=payload).status_code)
                if i % 5 == 0:  # a client retry: the same id again
                    statuses.append(client.post("/feedback", json=payload).status_code)

    threads = [threading.Thread(target=send, args=(w,)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=DEADLINE_SECONDS)
    assert statuses.count(201) == WORKERS * 25 and statuses.count(200) == WORKERS * 5
    stored = feedback.read(root / "data" / "feedback" / "feedback.db")
    assert len(stored) == WORKERS * 25 and stored["id"].is_unique
    assert httpx.post(f"{url}/feedback", json={"text": "x", "label": "fresh"}).status_code == 401
