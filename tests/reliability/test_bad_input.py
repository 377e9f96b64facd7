"""Bad input to `flywheel run` (issue 18, point 1): each case goes through the real command, flow
and stages, on a project that already has a data version and a champion; each must stop with a
message naming the file, row, column or key and what would fix it, and leave no new data version,
no new registered version and no moved alias.

The cases, what they must say and what they may not change are one table (CASES): docs/
reliability.md lists it.
"""

from __future__ import annotations

import bz2
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from flywheel import sources, tracking
from flywheel.cli import app
from flywheel.flows.pipeline import pipeline
from tests.conftest import make_project, run

MODEL = "flywheel-classifier"


def rows(n: int = 120, labels: tuple[str, ...] = ("pos", "neg"), text=None) -> list[tuple]:
    text = text or (lambda i: f"review number {i} of a film")
    return [(text(i), labels[i % len(labels)]) for i in range(n)]


GOOD_CSV = "text,label\n" + "".join(f"{t},{label}\n" for t, label in rows())


@dataclass(frozen=True)
class Case:
    """One bad input: how to make it (in a scratch folder; returns the `flywheel run` arguments
    and the file to name), and what the message must contain."""

    make: Callable[[Path, Path], tuple[list[str], Path | None]]
    says: tuple[str, ...]  # all of these, besides the file's path when there is a file


def source(name: str, payload: bytes | str | Callable[[Path], None], *extra: str):
    """A --source case: the file `name` in the scratch folder, written from `payload`."""

    def make(scratch: Path, root: Path) -> tuple[list[str], Path]:
        path = scratch / name
        if callable(payload):
            payload(path)
        elif isinstance(payload, str):
            path.write_text(payload, encoding="utf-8")
        else:
            path.write_bytes(payload)
        return ["--source", str(path), *extra], path

    return make


def frame_to(kind: str, frame: pd.DataFrame) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        frame.columns = ["text", "label"]
        if kind == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)

    return write


def two_classes(first: int, second: int) -> Callable[[Path], None]:
    """A CSV with `first` rows of label a and `second` rows of label b."""
    rows = [(f"first kind {i}", "a") for i in range(first)]
    rows += [(f"second kind {i}", "b") for i in range(second)]
    return frame_to("csv", pd.DataFrame(rows))


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def folder_mixing_formats(path: Path) -> None:
    path.mkdir()
    (path / "a.csv").write_text(GOOD_CSV)
    frame = pd.DataFrame(rows(), columns=["review", "label"])
    frame.to_parquet(path / "b.parquet", index=False)


def params_edit(edit: Callable[[dict], None], *extra: str):
    """A params.yaml case: the project's params with `edit` applied, in the scratch folder."""

    def make(scratch: Path, root: Path) -> tuple[list[str], Path]:
        params = yaml.safe_load((root / "params.yaml").read_text())
        edit(params)
        path = root / "params.bad.yaml"  # beside params.yaml: its paths stay the project's
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return ["--params", str(path), *extra], path

    return make


def store_case(write: Callable[[Path], None]):
    """A feedback-store case: data.feedback.path names a file that is not our store."""

    def make(scratch: Path, root: Path) -> tuple[list[str], Path]:
        path = scratch / "feedback.db"
        write(path)
        return ["--set", f"data.feedback.path={path}"], path

    return make


def foreign_database(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER, total REAL)")
    conn.close()


LONG = "a" * 1_000_000
CASES: dict[str, Case] = {
    "missing file": Case(
        lambda scratch, root: (["--source", str(scratch / "nope.csv")], scratch / "nope.csv"),
        ("source path does not exist",),
    ),
    "empty file": Case(source("e.csv", b""), ("file is empty",)),
    "header only": Case(source("h.csv", "text,label\n"), ("header only, no data rows",)),
    "wrong columns": Case(
        source("w.csv", GOOD_CSV.replace("text,label", "review,stars", 1)),
        ("missing column(s) 'text', 'label' (columns: review, stars)", "--text-col"),
    ),
    "missing label column": Case(
        source("m.csv", "text\n" + "".join(f"{t}\n" for t, _ in rows())),
        ("missing column(s) 'label' (columns: text)", "--label-col"),
    ),
    "non-UTF-8 file": Case(
        source("l.csv", GOOD_CSV.replace("review number 3 ", "caf\u00e9 ").encode("cp1252")),
        ("line 5: not valid UTF-8 (byte 0xe9", "re-save the file as UTF-8"),
    ),
    "mixed encodings": Case(
        source(
            "mixed.csv",
            GOOD_CSV.encode() + "na\u00efve one,pos\n".encode("latin-1") + b"fine,neg\n",
        ),
        ("line 122: not valid UTF-8 (byte 0xef", "lines from several encodings"),
    ),
    "UTF-16 file": Case(
        source("u16.csv", GOOD_CSV.encode("utf-16-le")),
        ("line 1: NUL byte", "UTF-16", "re-save it as UTF-8"),
    ),
    "NUL byte in a row": Case(
        source("nul.csv", GOOD_CSV.replace("number 7 ", "number\x007 ").encode()),
        ("line 9: NUL byte",),
    ),
    "ragged CSV rows": Case(
        source("r.csv", GOOD_CSV + "b,neg,extra\n"),
        ("line 122: 3 field(s), the header has 2 (text, label)", "quote fields"),
    ),
    "unterminated quote": Case(
        source("q.csv", GOOD_CSV + '"never closed,pos\n'), ("malformed CSV", "line 1")
    ),
    "1 MB text": Case(
        source("big.csv", GOOD_CSV + f"{LONG},pos\n"),
        (
            "text is at most 5,000 characters long (1 of 121 rows)",
            "fix: set validate.max_text_chars: 1000000 in params.yaml "
            "(or --set validate.max_text_chars=1000000)",
        ),
    ),
    "all texts empty after cleaning": Case(
        source("html.csv", frame_to("csv", pd.DataFrame(rows(text=lambda i: "<br>" * (i + 1))))),
        ("cleaning left no rows of any label", "120 emptied by cleaning", "row html.csv:1"),
    ),
    "one class only": Case(
        source("one.csv", frame_to("csv", pd.DataFrame(rows(labels=("pos",))))),
        ("at least 2 distinct labels", "fix: a classifier needs at least 2 labels"),
    ),
    "labels differing by case or spacing": Case(
        source(
            "spell.csv",
            frame_to("csv", pd.DataFrame(rows(400, ("pos", "neg", "Pos ", "NEG")))),
        ),
        (
            "no two labels differ only in case or spacing (200 of 400 rows)",
            "fix: spell each label one way in the source: 'Pos ' / 'pos'; 'NEG' / 'neg'",
        ),
    ),
    "over 50 % duplicates": Case(
        source("dup.csv", frame_to("csv", pd.DataFrame(rows(text=lambda i: f"same {i % 30}")))),
        (
            "at most 5.0% of texts repeat an earlier text (90 of 120 rows)",
            "fix: set validate.max_duplicate_rate: 0.75 in params.yaml",
        ),
    ),
    "class imbalance": Case(
        source("imb.csv", two_classes(600, 50)),
        (
            "largest class is at most 10x the smallest",
            "fix: set validate.max_class_imbalance: 12 in params.yaml "
            "(or --set validate.max_class_imbalance=12)",
        ),
    ),
    "too few rows of a class": Case(
        source("few.csv", two_classes(60, 10)),
        (
            "every label has at least 50 rows (10 of 70 rows)",
            "fix: set validate.min_rows_per_class: 10 in params.yaml",
            "(label 'b' has 10 rows)",
        ),
    ),
    "Parquet with a numeric text column": Case(
        source(
            "types.parquet",
            frame_to("parquet", pd.DataFrame({"text": range(120), "label": ["a", "b"] * 60})),
        ),
        ("column 'text' is of type int64 (row 1: 0); it needs text", "--text-col"),
    ),
    "JSONL with mixed schemas": Case(
        source(
            "mixed.jsonl",
            jsonl(
                [{"text": t, "label": label} for t, label in rows(5)]
                + [{"review": "other shape", "stars": 4}]
            ),
        ),
        ("line 6: no 'text' key (keys: review, stars)", "every line needs the same keys"),
    ),
    "JSONL with a list as text": Case(
        source("list.jsonl", jsonl([{"text": ["a", "list"], "label": "pos"}])),
        ("line 1: 'text' is ['a', 'list']; it needs text",),
    ),
    "folder mixing formats and columns": Case(
        source("folder", folder_mixing_formats),
        ("b.parquet: missing column(s) 'text'", "--text-col"),
    ),
    "params: unknown key": Case(
        params_edit(lambda p: p["train"].update(epochz=3)),
        ("train.epochz: unknown key", "`flywheel config` lists the keys"),
    ),
    "params: wrong type": Case(
        params_edit(lambda p: p["train"].update(batch_size="thirty-two")),
        ("invalid configuration", "train.batch_size: Input should be a valid integer"),
    ),
    "params: impossible value": Case(
        params_edit(lambda p: p["split"].update(train=0.9)),
        ("split: train + val + test must sum to 1 (got 1.1)",),
    ),
    "params: a profile that does not exist": Case(
        lambda scratch, root: (["--profile", "nope"], None),
        ("params.yaml: unknown profile 'nope' (profiles: gpu)",),
    ),
    "tampered vendored data": Case(
        lambda scratch, root: ([], None),  # the default source; the file is swapped by the test
        ("checksum mismatch", sources.ROTTEN_TOMATOES_FILE),
    ),
    "feedback store that is not SQLite": Case(
        store_case(lambda p: p.write_text("id,text,label\n1,hello,pos\n")),
        ("not an SQLite database", "data.feedback.path", "data.feedback.enabled: false"),
    ),
    "feedback store of another program": Case(
        store_case(foreign_database),
        ("another program's SQLite database (tables: orders)", "data.feedback.path"),
    ),
}


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_server) -> Path:
    """A committed project with a data version (dvc.lock) and a registered champion."""
    base = tmp_path_factory.mktemp("bad-input")
    root = make_project(base / "project", base / "remote")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        # The flow itself, not through CliRunner: Prefect's console log handler keeps the stream
        # of the first flow run, and each CliRunner invocation closes its own.
        pipeline(params_path=root / "params.yaml", data_only=True)
        artifacts = root / "mlflow" / "some-model"
        artifacts.mkdir(parents=True)
        (artifacts / "MLmodel").write_text("flavors: {}\n")
        client = tracking.client(tracking.default_uri(root))
        client.create_registered_model(MODEL)
        version = client.create_model_version(MODEL, artifacts.as_uri())
        client.set_registered_model_alias(MODEL, "champion", version.version)
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "p"], root)
    return root


def state(root: Path) -> dict[str, object]:
    """What a failed run may not change: the data versions (dvc.lock, the prepared data, one-off
    runs' pointers and data), the DVC cache and remote, registered versions and aliases."""

    def files(folder: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }

    client = tracking.client(tracking.default_uri(root))
    versions = client.search_model_versions(f"name='{MODEL}'")
    return {
        "dvc.lock": (root / "dvc.lock").read_bytes(),
        "prepared": files(root / "data" / "prepared"),
        "runs": sorted(
            str(p.relative_to(root))
            for p in (root / "data" / "runs").glob("*/*")
            if p.name.startswith("prepared")
        ),
        "cache": sorted(files(root / ".dvc" / "cache")),
        "remote": sorted(files(root.parent / "remote")),
        "versions": sorted((v.version, v.run_id, v.source) for v in versions),
        "aliases": client.get_registered_model(MODEL).aliases,
    }


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_stops_with_a_clear_error_and_changes_nothing(
    project, tmp_path, monkeypatch, case
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args, named = CASES[case].make(tmp_path, project)
    if case == "tampered vendored data":
        tampered = tmp_path / sources.ROTTEN_TOMATOES_FILE
        payload = bz2.decompress(sources.embedded_path().read_bytes())
        tampered.write_bytes(bz2.compress(payload.replace(b"fresh", b"rotten", 1)))
        monkeypatch.setattr(sources, "embedded_path", lambda name="rotten_tomatoes": tampered)
        named = tampered
    before = state(project)
    out = CliRunner().invoke(app, ["run", "--params", str(project / "params.yaml"), *args])
    output = " ".join(out.output.split())  # as one line: messages wrap on the terminal
    assert out.exit_code != 0, out.output
    for phrase in CASES[case].says:
        assert phrase in output, out.output
    if named is not None:
        assert str(named) in output, out.output
    assert "Traceback" not in out.output
    assert state(project) == before
    if (project / "params.bad.yaml").exists():
        (project / "params.bad.yaml").unlink()


def test_a_utf8_bom_is_read_as_the_file_without_it(tmp_path):
    """Not an error: editors on Windows write a BOM; the first column keeps its name."""
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD_CSV.encode())
    frame = sources.read_table(path, {"text": False, "label": True})
    assert frame.columns.tolist() == ["text", "label"]
    assert len(frame) == 120
    jsonl_path = tmp_path / "bom.jsonl"
    jsonl_path.write_bytes(b"\xef\xbb\xbf" + jsonl([{"text": "a", "label": "b"}]).encode())
    assert sources.read_table(jsonl_path, {"text": False, "label": True}).columns.tolist() == [
        "text",
        "label",
    ]
