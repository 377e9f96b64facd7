"""Sources: read every configured source into one raw table (text, label, source, origin).

`origin` says where a row came from ("reviews.csv:12" = 12th data row of reviews.csv, header not
counted) so that later errors can point at the file and row. Reading is strict: a file that
cannot be read whole is an error naming the file, never a silently shortened table. Feedback rows
are screened one by one before they join (docs/decisions/0010).
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import numbers as numbers_
from collections.abc import Collection, Mapping, Sequence
from importlib import resources
from pathlib import Path

import pandas as pd
import pyarrow as pa

from flywheel import feedback
from flywheel.config import (
    Config,
    DataConfig,
    EmbeddedSource,
    PathSource,
    ValidateConfig,
    resolve_path,
)
from flywheel.errors import FlywheelError
from flywheel.io import read_verified
from flywheel.stores import StoreError

RAW_COLUMNS = ["text", "label", "source", "origin"]
MAX_FIELD_BYTES = 64 * 1024 * 1024
SUPPORTED_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}

# The vendored Rotten Tomatoes snippets (see flywheel/datasets/rotten_tomatoes/README.md).
ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
ROTTEN_TOMATOES_LABELS = ("fresh", "rotten")


class SourceError(FlywheelError, ValueError):
    """A source that cannot be read as labelled text; the message names the file (and row)."""


def embedded_path(name: str = "rotten_tomatoes") -> Path:
    """Path of an embedded data file inside the installed package."""
    return Path(str(resources.files("flywheel.datasets") / name / ROTTEN_TOMATOES_FILE))


def read_embedded(source: EmbeddedSource) -> pd.DataFrame:
    """The Rotten Tomatoes critic snippets (fresh/rotten), checksum-verified; plot rows dropped."""
    path = embedded_path(source.name)
    payload = read_verified(path, ROTTEN_TOMATOES_SHA256, SourceError)
    frame = pd.read_csv(io.BytesIO(bz2.decompress(payload)), dtype="string")
    frame["origin"] = [f"{source.name}:{i}" for i in range(1, len(frame) + 1)]
    frame = frame[frame["category"].isin(ROTTEN_TOMATOES_LABELS)]
    return _to_raw(frame.rename(columns={"category": "label"}), source.name)


def list_files(path: Path) -> list[Path]:
    """A supported file, or the supported files under a folder (sorted, recursive)."""
    if not path.exists():
        raise SourceError(f"{path}: source path does not exist")
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise SourceError(
                f"{path}: unsupported file type {path.suffix!r} "
                f"(supported: {', '.join(SUPPORTED_SUFFIXES)})"
            )
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUPPORTED_SUFFIXES)
    if not files:
        raise SourceError(f"{path}: folder holds no {', '.join(SUPPORTED_SUFFIXES)} files")
    return files


def read_table(path: Path, columns: Mapping[str, bool] | None = None) -> pd.DataFrame:
    """Read one file as strings, strictly; errors name the file and, where known, the row.
    `columns`: those every record must have (checked per line in JSONL, where records may
    differ), each mapped to whether whole numbers are allowed besides text (labels: yes)."""
    columns = columns or {}
    kind = SUPPORTED_SUFFIXES[path.suffix.lower()]
    if path.stat().st_size == 0:
        raise SourceError(f"{path}: file is empty")
    try:
        if kind in ("csv", "tsv"):
            frame = _read_delimited(path, kind)
        elif kind == "jsonl":
            frame = _read_jsonl(path, columns)
        else:
            frame = _read_parquet(path, columns)
    except UnicodeDecodeError:
        raise SourceError(f"{path}: {_first_bad_utf8(path)}; re-save the file as UTF-8") from None
    if frame.empty:
        raise SourceError(f"{path}: header only, no data rows")
    return frame


def _first_bad_utf8(path: Path) -> str:
    """Where the first byte that is not UTF-8 is: line, byte and offset."""
    offset = 0
    with path.open("rb") as handle:
        for lineno, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                byte = line[exc.start]
                return (
                    f"line {lineno}: not valid UTF-8 (byte {byte:#04x} at offset "
                    f"{offset + exc.start}; a file in another encoding such as Latin-1 or "
                    "Windows-1252, or lines from several encodings)"
                )
            offset += len(line)
    return "not valid UTF-8"


def _nul_error(path: Path, line: int) -> SourceError:
    return SourceError(
        f"{path}: line {line}: NUL byte in the text (the file looks binary or UTF-16, not "
        "UTF-8 text); re-save it as UTF-8"
    )


def _read_delimited(path: Path, kind: str) -> pd.DataFrame:
    """CSV (RFC 4180 quoting) or TSV (no quoting: quotes are text); every row must have exactly
    as many fields as the header, otherwise the error names the line."""
    dialect = (
        {"delimiter": ","} if kind == "csv" else {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    )
    # csv caps fields at 128 KiB; long texts are the validation stage's to judge, with the row.
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD_BYTES))
    with path.open(encoding="utf-8-sig", newline="") as handle:  # -sig: a BOM is not a column
        reader = csv.reader(handle, strict=True, **dialect)
        try:
            header = next(reader, None)
            if header is None:
                raise SourceError(f"{path}: file is empty")
            if any("\x00" in field for field in header):
                raise _nul_error(path, 1)
            rows = []
            for row in reader:
                if not row:
                    continue  # blank line
                if len(row) != len(header):
                    raise SourceError(
                        f"{path}: line {reader.line_num}: {len(row)} field(s), the header has "
                        f"{len(header)} ({', '.join(header)}); quote fields that contain "
                        f"{'commas' if kind == 'csv' else 'tabs'}"
                    )
                if any("\x00" in field for field in row):
                    raise _nul_error(path, reader.line_num)
                rows.append(row)
        except csv.Error as exc:
            raise SourceError(
                f"{path}: line {reader.line_num}: malformed {kind.upper()}: {exc}"
            ) from None
    return pd.DataFrame(rows, columns=header, dtype="string")


def _read_parquet(path: Path, columns: Mapping[str, bool]) -> pd.DataFrame:
    # Only Arrow's own errors mean a bad file; an OSError stays an I/O error (and is retried).
    try:
        frame = pd.read_parquet(path)
    except pa.ArrowException as exc:
        raise SourceError(f"{path}: not a readable Parquet file ({exc})") from None
    for column, numbers in columns.items():
        if column in frame.columns:
            wrong = frame[column].map(lambda v, n=numbers: not _is_value(v, n))
            if wrong.any():
                row = int(wrong.to_numpy().argmax()) + 1
                raise SourceError(
                    f"{path}: column {column!r} is of type {frame[column].dtype} (row {row}: "
                    f"{_clip(frame[column].iloc[row - 1])}); it needs {_wanted(numbers)}: name "
                    "another column with --text-col / --label-col, or convert this one"
                )
    return frame


def _read_jsonl(path: Path, columns: Mapping[str, bool]) -> pd.DataFrame:
    records = []
    with path.open(encoding="utf-8-sig") as handle:  # -sig: a BOM is not part of the first key
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if "\x00" in line:
                raise _nul_error(path, lineno)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{path}: line {lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise SourceError(f"{path}: line {lineno}: expected a JSON object per line")
            for column, numbers in columns.items():
                if column not in record:
                    raise SourceError(
                        f"{path}: line {lineno}: no {column!r} key (keys: "
                        f"{', '.join(map(str, record)) or 'none'}); every line needs the same "
                        "keys: fix the line, or name the keys with --text-col / --label-col"
                    )
                if not _is_value(record[column], numbers):
                    raise SourceError(
                        f"{path}: line {lineno}: {column!r} is {_clip(record[column])}; it needs "
                        f"{_wanted(numbers)}"
                    )
            records.append(record)
    return pd.DataFrame.from_records(records)


def _is_value(value: object, numbers: bool) -> bool:
    """Text or null (a null is the validation gate's to report, with its row); with `numbers`,
    also a whole number (numeric labels)."""
    if value is None or isinstance(value, str):
        return True
    if isinstance(value, float) and value != value:
        return True  # NaN: a null
    if not numbers or isinstance(value, bool):
        return False
    return isinstance(value, numbers_.Integral) or (
        isinstance(value, numbers_.Real) and float(value).is_integer()
    )


def _wanted(numbers: bool) -> str:
    return "text or whole numbers" if numbers else "text"


def _clip(value: object, width: int = 60) -> str:
    text = repr(value.item() if hasattr(value, "item") else value)  # numpy scalars as Python
    return text if len(text) <= width else text[:width] + "..."


def read_path_source(source: PathSource, root: Path) -> pd.DataFrame:
    """Every file of a path source, with its text and label columns renamed to text/label."""
    base = resolve_path(root, source.path)
    frames = []
    for file in list_files(base):
        frame = read_table(file, {source.text_col: False, source.label_col: True})
        missing = [c for c in (source.text_col, source.label_col) if c not in frame.columns]
        if missing:
            raise SourceError(
                f"{file}: missing column(s) {', '.join(map(repr, missing))} "
                f"(columns: {', '.join(map(str, frame.columns))}); "
                "name the right ones with --text-col / --label-col"
            )
        frame = frame.rename(columns={source.text_col: "text", source.label_col: "label"})
        frame["origin"] = [f"{file.name}:{i}" for i in range(1, len(frame) + 1)]
        frames.append(_to_raw(frame, _display(file, root)))
    return pd.concat(frames, ignore_index=True)


def read_feedback(
    path: Path, rules: ValidateConfig, mask: Sequence[str], known_labels: Collection[str]
) -> tuple[pd.DataFrame, feedback.ScreenSummary]:
    """The accepted feedback rows as raw rows (source 'feedback') and what became of every row
    read (its newest seq is the watermark); an absent store gives no rows."""
    try:
        stored = feedback.read(path)
    except StoreError as exc:
        raise SourceError(
            f"{exc}: data.feedback.path must name the feedback store `flywheel serve` writes; "
            "move this file away, point data.feedback.path elsewhere, or set "
            "data.feedback.enabled: false"
        ) from None
    screened = feedback.screen(stored, rules, mask, known_labels)
    frame = screened[screened["status"] == feedback.ACCEPTED]
    frame = frame.assign(origin="feedback:" + frame["id"])
    return _to_raw(frame, feedback.SOURCE), feedback.summarise(screened)


def read_sources(data: DataConfig, root: Path) -> pd.DataFrame:
    """Every configured source but feedback, as one raw table."""
    frames = [
        read_embedded(s) if isinstance(s, EmbeddedSource) else read_path_source(s, root)
        for s in data.sources
    ]
    return pd.concat(frames, ignore_index=True)


def collect_frame(
    data: DataConfig, root: Path, rules: ValidateConfig, mask: Sequence[str]
) -> tuple[pd.DataFrame, feedback.ScreenSummary | None]:
    """Read all sources of the data config into one raw table, the accepted feedback rows last;
    with what became of the feedback rows (None when feedback is off). `rules` and `mask` are
    the validate and clean.mask_pii settings the feedback rows are judged by."""
    raw = read_sources(data, root)
    if not data.feedback.enabled:
        return raw, None
    rows, summary = read_feedback(
        resolve_path(root, data.feedback.path), rules, mask, set(raw["label"].dropna())
    )
    return pd.concat([raw, rows], ignore_index=True), summary


def screen_feedback(cfg: Config, stored: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every feedback row (`stored`, as feedback.read gives them; default: read the store) with
    what the next collect would do with it (`status`, `reason`); reads the other sources only
    when validate.labels is null (their labels are the set)."""
    rules = cfg.validate_
    known = () if rules.labels is not None else set(read_sources(cfg.data, cfg.root)["label"])
    if stored is None:
        stored = feedback.read(cfg.resolve(cfg.data.feedback.path))
    return feedback.screen(stored, rules, cfg.clean.mask_pii, known)


def _to_raw(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    out = frame[["text", "label", "origin"]].astype("string")
    out.insert(2, "source", pd.Series(source, index=out.index, dtype="string"))
    return out[RAW_COLUMNS].reset_index(drop=True)


def _display(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)
