import sqlite3
import threading

import pytest

from flywheel import feedback
from flywheel.feedback import FeedbackRecord


def test_schema_columns_and_version(tmp_path):
    path = tmp_path / "fb.db"
    feedback.connect(path).close()
    conn = sqlite3.connect(path)
    columns = [row[1] for row in conn.execute("PRAGMA table_info(feedback)")]
    assert tuple(columns) == feedback.COLUMNS
    assert conn.execute("PRAGMA user_version").fetchone()[0] == feedback.SCHEMA_VERSION


def test_add_is_idempotent_on_id(tmp_path):
    path = tmp_path / "fb.db"
    record = FeedbackRecord(text="great", label="pos", predicted_label="neg", model_version="3")
    assert feedback.add(path, [record]) == 1
    assert feedback.add(path, [record]) == 0
    rows = feedback.read(path)
    assert len(rows) == 1
    assert rows.iloc[0][
        ["text", "label", "predicted_label", "model_version", "source"]
    ].tolist() == ["great", "pos", "neg", "3", "api"]


def test_blank_text_is_rejected_by_the_store(tmp_path):
    with pytest.raises(sqlite3.IntegrityError):
        feedback.add(tmp_path / "fb.db", [FeedbackRecord(text="   ", label="pos")])


def test_concurrent_writers_lose_no_rows(tmp_path):
    path = tmp_path / "fb.db"
    feedback.connect(path).close()

    def write(worker: int) -> None:
        for i in range(25):
            feedback.add(path, [FeedbackRecord(text=f"w{worker} t{i}", label="pos")])

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(feedback.read(path)) == 100


def test_reading_never_changes_the_file(tmp_path):
    path = tmp_path / "fb.db"
    feedback.add(path, [FeedbackRecord(text="great", label="pos")])
    before = path.read_bytes()
    for _ in range(3):
        assert len(feedback.read(path)) == 1
    assert path.read_bytes() == before


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "fb.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RuntimeError, match="schema version 99"):
        feedback.read(path)


V1_DDL = """
CREATE TABLE feedback (
    id TEXT PRIMARY KEY, text TEXT NOT NULL, label TEXT NOT NULL, predicted_label TEXT,
    model_version TEXT, created_at TEXT NOT NULL, source TEXT NOT NULL DEFAULT 'api');
PRAGMA user_version = 1;
INSERT INTO feedback VALUES ('old', 'kept text', 'pos', NULL, NULL, '2026-01-01T00:00:00', 'api');
"""


def test_a_version_1_store_reads_and_is_migrated_on_the_first_write(tmp_path):
    path = tmp_path / "fb.db"
    conn = sqlite3.connect(path)
    conn.executescript(V1_DDL)
    conn.close()
    rows = feedback.read(path)  # read-only: no migration, no prediction ids
    assert rows["id"].tolist() == ["old"] and rows["prediction_id"].isna().all()
    feedback.add(path, [FeedbackRecord(text="new", label="neg", id="n", prediction_id="p1")])
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == feedback.SCHEMA_VERSION
    conn.close()
    rows = feedback.read(path)
    assert rows["id"].tolist() == ["old", "n"]
    assert rows["prediction_id"].isna().tolist() == [True, False]
    assert rows["prediction_id"].iloc[1] == "p1"


def test_seq_orders_by_arrival_and_reads_after_a_watermark(tmp_path):
    path = tmp_path / "fb.db"
    late_clock = FeedbackRecord(text="first", label="pos", created_at="2030-01-01T00:00:00")
    feedback.add(path, [late_clock, FeedbackRecord(text="second", label="neg")])
    rows = feedback.read(path)
    assert rows["text"].tolist() == ["first", "second"] and rows["seq"].tolist() == [1, 2]
    assert feedback.read(path, after_seq=1)["text"].tolist() == ["second"]
    assert feedback.read(path, after_seq=2).empty
