"""The prediction log: round trip, windows, lookup, pruning, concurrent writers."""

from __future__ import annotations

import threading

from flywheel import predictions
from flywheel.predictions import LoggedPrediction, PredictionLog


def row(pid: str, version: str = "1", label: str = "a", text: str | None = None):
    return LoggedPrediction(pid, predictions.now(), version, "h" * 64, 10, label, 0.75, 0.2, text)


def test_round_trip_window_filter_and_lookup(tmp_path):
    path = tmp_path / "p.db"
    log = PredictionLog(path, keep=1000)
    log.write([row(f"p{i}", version="1" if i < 5 else "2") for i in range(8)])
    log.write([row("raw", "2", "b", text="kept only when configured")])
    log.close()
    everything = predictions.read(path)
    assert everything["id"].tolist() == [f"p{i}" for i in range(8)] + ["raw"]  # oldest first
    newest = predictions.read(path, limit=3)
    assert newest["id"].tolist() == ["p6", "p7", "raw"]
    assert predictions.read(path, model_version="1", limit=2)["id"].tolist() == ["p3", "p4"]
    found = predictions.lookup(path, "raw")
    assert (found["label"], found["text"], found["confidence"]) == (
        "b",
        "kept only when configured",
        0.75,
    )
    assert predictions.lookup(path, "nope") is None


def test_the_log_keeps_its_newest_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(PredictionLog, "PRUNE_EVERY", 10)
    path = tmp_path / "p.db"
    log = PredictionLog(path, keep=15)
    for start in range(0, 40, 5):
        log.write([row(f"p{i}") for i in range(start, start + 5)])
    log.close()
    kept = predictions.read(path)["id"].tolist()
    assert kept[-1] == "p39" and len(kept) <= 15 + 10  # pruned every 10 rows to the newest 15
    assert "p0" not in kept


def test_concurrent_writers_lose_no_rows(tmp_path):
    path = tmp_path / "p.db"
    log = PredictionLog(path, keep=10_000)

    def write(worker: int) -> None:
        for i in range(50):
            log.write([row(f"w{worker}-{i}")])

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other = PredictionLog(path, keep=10_000)  # a second writer process's connection
    other.write([row("other")])
    other.close()
    log.close()
    frame = predictions.read(path)
    assert len(frame) == 201 and frame["id"].is_unique


def test_an_absent_log_reads_empty(tmp_path):
    assert predictions.read(tmp_path / "none.db").empty
    assert predictions.lookup(tmp_path / "none.db", "x") is None
    assert not (tmp_path / "none.db").exists()
