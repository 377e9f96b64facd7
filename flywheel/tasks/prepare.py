"""Clean and split: normalise text, mask PII, de-duplicate, split by a stable hash.

The split of a text depends only on its normalised form and the seed, so a text keeps its split
when the data grows: no leakage between train and test across data versions. The same hash
thresholds apply to every class, so each class is split in the configured ratios (up to sampling
noise); summary.json reports the per-class counts of every split.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel.config import CleanConfig, Config, SplitConfig
from flywheel.errors import FlywheelError
from flywheel.io import read_parquet, replace_dir_atomic, write_json
from flywheel.pii import clean_and_mask, counts_line
from flywheel.stages import StageSpec
from flywheel.tasks.collect import CollectResult
from flywheel.tasks.validate import ValidationReport, require_validated
from flywheel.text import normalised_key

STAGE = StageSpec(
    name="prepare",
    module=__name__,
    reads=("seed", "clean", "split", "validate.report_dir"),
    upstream=("validate",),
    artifacts=("prepared_dir",),
    keyed_on="raw",
    standalone="standalone",
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
PREPARED_COLUMNS = ["id", "text", "label", "source"]

# --- de-duplication and split ----------------------------------------------------------------


def split_of(key: str, seed: int, cfg: SplitConfig) -> str:
    """The split of a normalised text: a stable hash mapped onto the cumulative ratios."""
    digest = hashlib.sha256(f"{seed}\x1f{key}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < cfg.train:
        return "train"
    return "val" if position < cfg.train + cfg.val else "test"


@dataclass(frozen=True)
class CleanReport:
    """What cleaning did, row by row: counts after each step and what was masked or dropped."""

    rows_in: int
    emptied_by_cleaning: int
    conflicting_label_rows: int
    exact_duplicates: int
    normalised_duplicates: int
    rows_out: int
    pii_counts: dict[str, int]
    conflicts: list[dict[str, object]]


def clean_frame(raw: pd.DataFrame, cfg: CleanConfig) -> tuple[pd.DataFrame, CleanReport]:
    """Clean, mask and de-duplicate a raw table; returns the rows kept (with their key)."""
    frame = raw[["text", "label", "source", "origin"]].copy()
    frame["label"] = frame["label"].astype("string").str.strip()
    pii: Counter[str] = Counter()
    texts = []
    for text in frame["text"].astype(str):
        masked, counts = clean_and_mask(text, cfg.mask_pii)
        pii.update(counts)
        texts.append(masked)
    frame["text"] = pd.array(texts, dtype="string")
    emptied = frame["text"].str.len() == 0
    frame = frame[~emptied]
    frame["key"] = frame["text"].map(normalised_key)

    labels_per_key = frame.groupby("key")["label"].transform("nunique")
    conflicted = frame[labels_per_key > 1]
    conflicts = [
        {
            "text": group["text"].iloc[0],
            "labels": sorted(group["label"].unique()),
            "origins": group["origin"].tolist()[:5],
        }
        for _, group in conflicted.groupby("key", sort=True)
    ]
    frame = frame[labels_per_key <= 1]
    exact = frame.duplicated(subset=["text"])
    frame = frame[~exact]
    normalised = frame.duplicated(subset=["key"])
    frame = frame[~normalised].reset_index(drop=True)
    report = CleanReport(
        rows_in=len(raw),
        emptied_by_cleaning=int(emptied.sum()),
        conflicting_label_rows=len(conflicted),
        exact_duplicates=int(exact.sum()),
        normalised_duplicates=int(normalised.sum()),
        rows_out=len(frame),
        pii_counts={kind: pii.get(kind, 0) for kind in cfg.mask_pii},
        conflicts=conflicts,
    )
    return frame, report


def split_frame(frame: pd.DataFrame, seed: int, cfg: SplitConfig) -> dict[str, pd.DataFrame]:
    """Assign every cleaned row its split and a stable text id; one frame per split."""
    ids = frame["key"].map(lambda k: hashlib.sha256(k.encode()).hexdigest()[:16])
    split = frame["key"].map(lambda k: split_of(k, seed, cfg))
    out = frame.assign(id=ids.astype("string"))[PREPARED_COLUMNS]
    return {name: out[split == name].reset_index(drop=True) for name in SPLITS}


class CleanedAwayError(FlywheelError):
    """Cleaning (HTML, invisible characters, blanks, conflicts, repeats) left a label, or the
    whole data set, without rows."""


def check_no_label_lost(raw: pd.DataFrame, kept: pd.DataFrame, report: CleanReport) -> None:
    """Every label of the raw table keeps rows after cleaning; none silently disappears."""
    labels = raw["label"].astype("string").str.strip()  # as clean_frame writes them
    before = labels.value_counts()
    lost = [label for label in before.index if label not in set(kept["label"])]
    if not lost:
        return
    what = (
        f"{report.emptied_by_cleaning:,} emptied by cleaning (HTML tags and entities, "
        f"invisible characters, blanks), {report.conflicting_label_rows:,} with conflicting "
        f"labels, {report.exact_duplicates + report.normalised_duplicates:,} repeats"
    )
    whom = (
        "any label"
        if kept.empty
        else ", ".join(f"label {label!r} ({int(before[label]):,} rows)" for label in lost[:10])
    )
    examples = raw[labels.isin(lost)].head(3)
    shown = "; ".join(
        f"row {o}: {t[:40]!r}" for o, t in zip(examples["origin"], examples["text"], strict=True)
    )
    where = ", ".join(map(str, examples["source"].unique()))
    raise CleanedAwayError(
        f"cleaning left no rows of {whom} ({where}): of {report.rows_in:,} rows, {what} (e.g. "
        f"{shown}); "
        "check that --text-col names the text, or remove those rows from the source"
    )


class EmptySplitError(FlywheelError):
    """A label ended up with no rows in some split (too few rows of it for the ratios)."""


def check_every_label_in_every_split(splits: dict[str, pd.DataFrame]) -> None:
    """Each label must appear in train, val and test, or its metrics cannot be measured."""
    labels = sorted(set().union(*(set(part["label"]) for part in splits.values())))
    for label in labels:
        counts = {name: int((part["label"] == label).sum()) for name, part in splits.items()}
        empty = [name for name, n in counts.items() if n == 0]
        if empty:
            raise EmptySplitError(
                f"label {label!r} has no rows in the {' and '.join(empty)} split(s) "
                f"({', '.join(f'{k} {v}' for k, v in counts.items())}): add rows of this label, "
                "drop it, or raise validate.min_rows_per_class so validation catches it first"
            )


@dataclass(frozen=True)
class PrepareResult:
    """The prepared split files, the summary and the counts they hold."""

    prepared_dir: Path
    split_paths: dict[str, Path]
    summary_path: Path
    rows_per_split: dict[str, int]
    report: CleanReport


def split_path(cfg: Config, name: str) -> Path:
    """Where the pipeline's prepared split `name` (train, val, test) lives."""
    return cfg.resolve(cfg.split.prepared_dir) / f"{name}.parquet"


def summarise(splits: dict[str, pd.DataFrame], report: CleanReport, cfg: Config) -> dict:
    """The prepared data's summary.json: counts, per-class split sizes, PII and dedup figures."""
    return {
        "rows_per_split": {name: len(part) for name, part in splits.items()},
        "labels_per_split": {
            name: {str(k): int(v) for k, v in part["label"].value_counts().sort_index().items()}
            for name, part in splits.items()
        },
        "rows_per_source": {
            str(k): int(v)
            for k, v in pd.concat(splits.values())["source"].value_counts().sort_index().items()
        },
        "clean": asdict(report),
        "config": {"seed": cfg.seed, "clean": cfg.section("clean"), "split": cfg.section("split")},
    }


def prepare(cfg: Config, raw_path: Path, target: Path | None = None) -> PrepareResult:
    """Prepare stage: clean + split the raw table and replace data/prepared/ in one step.

    `target` writes elsewhere the same bytes (`flywheel run --dry-run` hashes them there)."""
    require_validated(cfg, raw_path)
    raw = read_parquet(raw_path)
    frame, report = clean_frame(raw, cfg.clean)
    check_no_label_lost(raw, frame, report)
    splits = split_frame(frame, cfg.seed, cfg.split)
    check_every_label_in_every_split(splits)
    target = target or cfg.resolve(cfg.split.prepared_dir)

    def write(staging: Path) -> None:
        for name, part in splits.items():
            part.to_parquet(staging / f"{name}.parquet", index=False)
        write_json(staging / "summary.json", summarise(splits, report, cfg))

    replace_dir_atomic(target, write)
    counts = (
        report.rows_in,
        report.emptied_by_cleaning,
        report.conflicting_label_rows,
        report.exact_duplicates,
        report.normalised_duplicates,
        report.rows_out,
    )
    log.info(
        "prepare: %s rows in, %s empty after cleaning, %s with conflicting labels, "
        "%s exact and %s normalised duplicates dropped, %s rows out",
        *(f"{n:,}" for n in counts),
    )
    log.info("prepare: PII masked after cleaning: %s", counts_line(report.pii_counts))
    log.info("prepare: split %s", ", ".join(f"{k} {len(v):,}" for k, v in splits.items()))
    return PrepareResult(
        prepared_dir=target,
        split_paths={name: target / f"{name}.parquet" for name in SPLITS},
        summary_path=target / "summary.json",
        rows_per_split={name: len(part) for name, part in splits.items()},
        report=report,
    )


def standalone(cfg: Config) -> str:
    """The stage without Prefect (`flywheel stage prepare`, dvc.yaml): what it wrote."""
    prepared = prepare(cfg, cfg.resolve(cfg.data.raw_path))
    return f"prepare: {prepared.rows_per_split} -> {prepared.prepared_dir}"


@task(name="prepare", cache_policy=NO_CACHE)
def prepare_task(
    cfg: Config, collected: CollectResult, validation: ValidationReport
) -> PrepareResult:
    """Prefect task: clean and split the raw table (`validation` orders it after the GX gate;
    `prepare` itself checks the gate passed on exactly this raw table)."""
    return prepare(cfg, collected.raw_path)
