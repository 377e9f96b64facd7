import json
from pathlib import Path

import pandas as pd
import pytest

from flywheel import feedback
from flywheel import sources as collect
from flywheel.config import (
    DataConfig,
    EmbeddedSource,
    FeedbackConfig,
    PathSource,
    ValidateConfig,
    load_config,
)
from flywheel.sources import SourceError, collect_frame, read_path_source
from flywheel.tasks.collect import collect as collect_stage
from tests.conftest import REPO

ROWS = [("loved it", "pos"), ("hated it", "neg"), ("fine, I guess", "pos")]
RULES = ValidateConfig(labels=None)  # feedback labels: those of the other sources


def write(path: Path, kind: str, text_col: str = "text", label_col: str = "label") -> Path:
    frame = pd.DataFrame(ROWS, columns=[text_col, label_col])
    if kind == "csv":
        frame.to_csv(path, index=False)
    elif kind == "tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))
    else:
        frame.to_parquet(path, index=False)
    return path


def source(path: Path, **cols) -> PathSource:
    return PathSource(kind="path", path=path, **cols)


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "parquet"])
def test_reads_each_format(tmp_path, kind):
    path = write(tmp_path / f"reviews.{kind}", kind)
    frame = read_path_source(source(path), tmp_path)
    assert frame.columns.tolist() == collect.RAW_COLUMNS
    assert list(zip(frame["text"], frame["label"], strict=True)) == ROWS
    assert frame["source"].unique().tolist() == [f"reviews.{kind}"]
    assert frame["origin"].tolist() == [f"reviews.{kind}:{i}" for i in (1, 2, 3)]


def test_reads_a_folder_with_custom_columns(tmp_path):
    write(tmp_path / "a.csv", "csv", "review", "stars")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "b.jsonl", "jsonl", "review", "stars")
    (tmp_path / "notes.txt").write_text("ignored")
    frame = read_path_source(source(tmp_path, text_col="review", label_col="stars"), tmp_path)
    assert len(frame) == 6
    assert sorted(frame["source"].unique()) == ["a.csv", "sub/b.jsonl"]


def test_embedded_default_data_is_the_documented_12808_rows():
    frame = collect.read_embedded(EmbeddedSource(kind="embedded"))
    assert len(frame) == 12_808
    assert frame["label"].value_counts().to_dict() == {"fresh": 7403, "rotten": 5405}
    assert frame["text"].notna().all()


def test_embedded_checksum_is_verified(monkeypatch):
    monkeypatch.setattr(collect, "ROTTEN_TOMATOES_SHA256", "0" * 64)
    with pytest.raises(SourceError, match="checksum mismatch"):
        collect.read_embedded(EmbeddedSource(kind="embedded"))


def test_feedback_rows_join_with_source_feedback(tmp_path):
    store = tmp_path / "fb.db"
    feedback.add(store, [feedback.FeedbackRecord(text="meh", label="neg", id="f1")])
    cfg = DataConfig(
        sources=[source(write(tmp_path / "r.csv", "csv"))],
        feedback=FeedbackConfig(enabled=True, path=store),
    )
    frame, screened = collect_frame(cfg, tmp_path, RULES, ())
    assert screened.newest_seq == 1  # the watermark: this data holds feedback up to row 1
    assert frame["source"].value_counts().to_dict() == {"r.csv": 3, "feedback": 1}
    assert frame.iloc[-1][["text", "label", "origin"]].tolist() == ["meh", "neg", "feedback:f1"]


def test_absent_feedback_store_gives_no_rows(tmp_path):
    cfg = DataConfig(
        sources=[source(write(tmp_path / "r.csv", "csv"))],
        feedback=FeedbackConfig(enabled=True, path=tmp_path / "missing.db"),
    )
    frame, screened = collect_frame(cfg, tmp_path, RULES, ())
    assert (len(frame), screened.newest_seq, screened.read) == (3, 0, 0)
    assert not (tmp_path / "missing.db").exists()


BAD_INPUTS = {
    "nonexistent path": (lambda d: d / "nope.csv", "source path does not exist"),
    "empty file": (lambda d: _bytes(d / "e.csv", b""), "file is empty"),
    "header only": (lambda d: _bytes(d / "h.csv", b"text,label\n"), "header only, no data rows"),
    "wrong columns": (
        lambda d: _bytes(d / "w.csv", b"review,stars\nok,1\n"),
        "missing column(s) 'text', 'label' (columns: review, stars)",
    ),
    "non-UTF-8 bytes": (
        lambda d: _bytes(d / "l.csv", "text,label\ncafé,pos\n".encode("latin-1")),
        "not valid UTF-8 (byte 0xe9",
    ),
    "ragged rows": (
        lambda d: _bytes(d / "r.csv", b"text,label\na,pos\nb,neg,extra\n"),
        "line 3: 3 field(s), the header has 2 (text, label)",
    ),
    "short row": (
        lambda d: _bytes(d / "s.csv", b"text,label\na,pos\nno label here\nc,neg\n"),
        "line 3: 1 field(s), the header has 2",
    ),
    "unterminated quote": (
        lambda d: _bytes(d / "q.csv", b'text,label\n"a,pos\n'),
        "malformed CSV",
    ),
    "corrupt parquet": (
        lambda d: _bytes(d / "c.parquet", b"PAR1 this is not parquet"),
        "not a readable Parquet file",
    ),
    "bad JSONL line": (
        lambda d: _bytes(d / "j.jsonl", b'{"text": "a", "label": "x"}\n{oops\n'),
        "line 2: not valid JSON",
    ),
    "unsupported type": (lambda d: _bytes(d / "x.xlsx", b"PK"), "unsupported file type '.xlsx'"),
    "empty folder": (lambda d: (d / "empty").mkdir() or d / "empty", "folder holds no"),
}


def _bytes(path: Path, payload: bytes) -> Path:
    path.write_bytes(payload)
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, case):
    make, phrase = BAD_INPUTS[case]
    path = make(tmp_path)
    cfg = load_config(
        REPO / "params.yaml",
        {
            "data.sources": [{"kind": "path", "path": str(path)}],
            "data.raw_path": str(tmp_path / "out" / "raw.parquet"),
        },
    )
    with pytest.raises(SourceError) as info:
        collect_stage(cfg)
    assert phrase in str(info.value)
    assert str(path) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_tsv_quotes_are_text_and_csv_quotes_are_quoting(tmp_path):
    tsv = _bytes(tmp_path / "q.tsv", b'text\tlabel\n"Great" movie\tpos\n')
    assert read_path_source(source(tsv), tmp_path)["text"].tolist() == ['"Great" movie']
    csv = _bytes(tmp_path / "q.csv", b'text,label\n"Great, really",pos\n')
    assert read_path_source(source(csv), tmp_path)["text"].tolist() == ["Great, really"]


def test_a_megabyte_text_is_read_whole(tmp_path):
    path = _bytes(tmp_path / "big.csv", b"text,label\n" + b"a" * 1_000_000 + b",pos\nok,neg\n")
    frame = read_path_source(source(path), tmp_path)
    assert frame["text"].str.len().tolist() == [1_000_000, 2]


def test_an_io_error_on_a_csv_stays_an_io_error(tmp_path, monkeypatch):
    path = write(tmp_path / "r.csv", "csv")

    def unreadable(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", unreadable)
    with pytest.raises(PermissionError):  # retried by the task, not a "bad Parquet" SourceError
        collect.read_table(path)


def test_personal_data_is_masked_before_the_raw_table_is_written(tmp_path):
    path = _bytes(
        tmp_path / "pii.csv",
        b"text,label\n"
        b'"<b>call 555-123-4567</b> or mail jane.doe@example.com",neg\n'
        b"write to jane&#46;doe&#64;example&#46;com,neg\n"  # an e-mail only cleaning reveals
        b"nothing personal,pos\n",
    )
    cfg = load_config(
        REPO / "params.yaml",
        {
            "data.sources": [{"kind": "path", "path": str(path)}],
            "data.raw_path": str(tmp_path / "out" / "raw.parquet"),
            "data.feedback.enabled": False,
        },
    )
    result = collect_stage(cfg)
    assert result.pii_counts == {"email": 2, "phone": 1}
    written = pd.read_parquet(result.raw_path)["text"].tolist()
    assert written == [
        "<b>call <PHONE></b> or mail <EMAIL>",  # as written, masked
        "write to <EMAIL>",  # cleaned and masked
        "nothing personal",
    ]
    payload = result.raw_path.read_bytes()
    assert b"555-123-4567" not in payload and b"jane" not in payload


def test_with_masking_off_the_raw_table_keeps_the_text(tmp_path):
    path = _bytes(tmp_path / "pii.csv", b"text,label\nmail jane.doe@example.com,neg\nok,pos\n")
    cfg = load_config(
        REPO / "params.yaml",
        {
            "data.sources": [{"kind": "path", "path": str(path)}],
            "data.raw_path": str(tmp_path / "out" / "raw.parquet"),
            "data.feedback.enabled": False,
            "clean.mask_pii": [],
        },
    )
    result = collect_stage(cfg)
    assert result.pii_counts == {}
    assert pd.read_parquet(result.raw_path)["text"].tolist()[0] == "mail jane.doe@example.com"
