import signal
import sqlite3
import subprocess
import sys
import threading

import pytest

from flywheel import feedback
from flywheel.feedback import FeedbackRecord
from flywheel.stores import StoreError, StoreVersionError


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
    with pytest.raises(StoreVersionError, match="schema version 99"):
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


MASK = ("url", "email", "iban", "card", "ip", "phone")


def test_received_text_is_cleaned_and_masked_as_the_clean_stage_does():
    record, masked = feedback.received(
        "<p>Mail jane@example.com&nbsp;now</p>", "pos", MASK, source="api"
    )
    assert record.text == "Mail <EMAIL> now" and masked == {"email": 1}
    kept, nothing = feedback.received("Mail jane@example.com now", "pos", ())
    assert kept.text == "Mail jane@example.com now" and not nothing  # masking is configured


def test_an_id_is_derived_from_text_and_label_only_when_none_is_given():
    one, _ = feedback.received("Great film!", "pos", MASK)
    same, _ = feedback.received("  great   FILM ", "pos", MASK)  # same normalised text
    other_label, _ = feedback.received("Great film!", "neg", MASK)
    other_text, _ = feedback.received("Great films!", "pos", MASK)
    assert one.id == same.id and len(one.id) == 32
    assert len({one.id, other_label.id, other_text.id}) == 3
    explicit, _ = feedback.received("Great film!", "pos", MASK, id="ticket-7")
    assert explicit.id == "ticket-7"


def test_the_same_text_and_label_is_stored_once_another_label_is_kept(tmp_path):
    path = tmp_path / "fb.db"
    send = [("Great film!", "pos"), ("great film", "pos"), ("Great film!", "neg")]
    new = [feedback.add(path, [feedback.received(t, y, MASK)[0]]) for t, y in send]
    assert new == [1, 0, 1]
    assert sorted(feedback.read(path)["label"]) == ["neg", "pos"]


def test_a_deleted_rows_seq_is_never_given_to_a_new_row(tmp_path):
    path = tmp_path / "fb.db"
    feedback.add(path, [FeedbackRecord(text=t, label="pos", id=t) for t in ("a", "b", "c")])
    feedback.delete(path, ["c"], "tester", "wrong label")
    feedback.add(path, [FeedbackRecord(text="d", label="pos", id="d")])
    assert feedback.read(path)[["id", "seq"]].values.tolist() == [["a", 1], ["b", 2], ["d", 4]]


def test_delete_is_logged_and_an_unknown_id_deletes_nothing(tmp_path):
    path = tmp_path / "fb.db"
    feedback.add(path, [FeedbackRecord(text=t, label="pos", id=t) for t in ("a", "b", "c")])
    before = path.read_bytes()
    with pytest.raises(feedback.FeedbackError, match="no feedback with id zz; nothing deleted"):
        feedback.delete(path, ["a", "zz"], "tester", "typo")
    would = feedback.delete(path, ["b", "a"], "tester", "dry", dry_run=True)
    assert would["id"].tolist() == ["a", "b"] and path.read_bytes() == before
    gone = feedback.delete(path, ["b", "a"], "tester", "personal data")
    assert gone["seq"].tolist() == [1, 2]
    assert feedback.read(path)["id"].tolist() == ["c"]
    log = feedback.deletions(path)
    assert log[["seq", "id", "user", "reason"]].values.tolist() == [
        [1, "a", "tester", "personal data"],
        [2, "b", "tester", "personal data"],
    ]
    assert log["deleted_at"].notna().all()


def test_the_deletion_log_of_a_store_without_deletions_is_empty(tmp_path):
    path = tmp_path / "fb.db"
    conn = sqlite3.connect(path)
    conn.executescript(V1_DDL)
    conn.close()
    assert feedback.deletions(path).empty  # an old store: no log table yet, read-only
    assert feedback.deletions(tmp_path / "absent.db").empty


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_export_writes_every_row_by_suffix(tmp_path, suffix):
    import pandas as pd

    path = tmp_path / "fb.db"
    feedback.add(path, [FeedbackRecord(text='a, "quoted"\nline', label="pos", id="a")])
    target = tmp_path / "out" / f"feedback{suffix}"
    assert feedback.export(path, target) == 1
    back = pd.read_csv(target) if suffix == ".csv" else pd.read_json(target, lines=True)
    assert back[["seq", "id", "text"]].values.tolist() == [[1, "a", 'a, "quoted"\nline']]


def test_export_refuses_an_unknown_suffix_and_writes_nothing(tmp_path):
    with pytest.raises(feedback.FeedbackError, match=r"name the file \*\.csv or \*\.jsonl"):
        feedback.export(tmp_path / "fb.db", tmp_path / "feedback.xlsx")
    assert not (tmp_path / "feedback.xlsx").exists()


def test_a_file_that_is_not_a_flywheel_store_is_refused_naming_it(tmp_path):
    text = tmp_path / "notes.db"
    text.write_text("id,text,label\n1,hello,pos\n")
    foreign = tmp_path / "shop.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE orders (id INTEGER)")
    conn.commit()
    conn.close()
    for path, phrase in ((text, "not an SQLite database"), (foreign, "tables: orders")):
        before = path.read_bytes()
        with pytest.raises(StoreError, match=phrase) as info:
            feedback.read(path)
        assert str(path) in str(info.value)
        with pytest.raises(StoreError, match=phrase):
            feedback.add(path, [FeedbackRecord(text="a", label="b")])
        assert path.read_bytes() == before  # not written into
    ours = tmp_path / "feedback.db"
    feedback.add(ours, [FeedbackRecord(text="a", label="b")])
    assert len(feedback.read(ours)) == 1


DIES_MID_TRANSACTION = """
import os, signal, sys
from pathlib import Path
from flywheel import feedback
conn = feedback.connect(Path(sys.argv[1]))
conn.execute("PRAGMA cache_size = 5")  # the transaction spills into the file before its commit
conn.execute("BEGIN IMMEDIATE")
conn.execute(
    "UPDATE feedback SET label = 'half-written' WHERE id IN (SELECT id FROM feedback LIMIT 150)"
)
conn.execute(
    "INSERT INTO feedback (id, text, label, created_at)"
    " VALUES ('dying', 'never committed', 'neg', '2026-12-07T00:00:00')"
)
os.kill(os.getpid(), signal.SIGKILL)  # the transaction is neither committed nor rolled back
"""


def test_a_writer_killed_mid_transaction_leaves_a_store_that_reads_back_its_committed_rows(
    tmp_path,
):
    path = tmp_path / "fb.db"
    feedback.add(
        path, [FeedbackRecord(text=f"row {i} " + "x" * 3000, label="pos") for i in range(200)]
    )
    died = subprocess.run([sys.executable, "-c", DIES_MID_TRANSACTION, str(path)], timeout=60)
    assert died.returncode == -signal.SIGKILL
    journal = path.with_name(path.name + "-journal")
    assert journal.stat().st_size > 0  # a hot journal: a read-only connection may not use it
    ro = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        ro.execute("SELECT count(*) FROM feedback").fetchone()
    ro.close()

    rows = feedback.read(path)  # rolls the dead writer's transaction back, then reads
    assert len(rows) == 200 and set(rows["label"]) == {"pos"}
    assert "dying" not in set(rows["id"])
    assert not journal.exists() or journal.stat().st_size == 0
    assert feedback.add(path, [FeedbackRecord(text="after", label="neg")]) == 1
