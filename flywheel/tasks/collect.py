"""Collect stage: read every configured source (flywheel/sources.py) into the raw table, with
personal data masked (clean.mask_pii) before it is written: no file Flywheel writes holds the
personal data of a source (your own source files do, of course).

Feedback rows are screened before they join (docs/decisions/0010): a row the validation gate
would refuse is quarantined, a repeat is dropped, so feedback alone can never fail a run.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import feedback
from flywheel.config import Config
from flywheel.io import file_md5, write_parquet_atomic
from flywheel.pii import counts_line, mask_raw
from flywheel.retries import retry_on_io
from flywheel.sources import collect_frame
from flywheel.stages import StageSpec

STAGE = StageSpec(
    name="collect",
    module=__name__,
    reads=("data", "validate", "clean.mask_pii"),  # feedback rows are screened as they join
    keyed_on=None,  # always runs: reading the sources is how a change shows
    standalone="standalone",
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectResult:
    """The raw table's path, its md5 (what validate and prepare are keyed on), how many rows
    each source gave and how much personal data was masked before it was written."""

    raw_path: Path
    rows: int
    rows_per_source: dict[str, int]
    raw_md5: str
    feedback_seq: int = 0  # the newest feedback row read (its store seq); 0: none
    feedback: feedback.ScreenSummary | None = None  # what became of the feedback rows read
    pii_counts: dict[str, int] = field(default_factory=dict)  # masked in the raw table, by kind


def collect(cfg: Config) -> CollectResult:
    """Collect stage: read the sources, write the raw table atomically, count rows per source."""
    raw, screened = collect_frame(cfg.data, cfg.root, cfg.validate_, cfg.clean.mask_pii)
    raw, pii = mask_frame(raw, cfg.clean.mask_pii)
    counts = {str(k): int(v) for k, v in raw["source"].value_counts(sort=False).items()}
    for name, count in counts.items():
        log.info("collect: %s rows from %s", f"{count:,}", name)
    if screened is not None:
        level = logging.WARNING if screened.quarantined else logging.INFO
        hint = "; see `flywheel feedback list --quarantined`" if screened.quarantined else ""
        log.log(level, "collect: %s%s", screened.line(), hint)
    if pii:
        log.info("collect: PII masked before writing: %s", counts_line(pii))
    raw_path = cfg.resolve(cfg.data.raw_path)
    write_parquet_atomic(raw, raw_path)
    newest = screened.newest_seq if screened is not None else 0
    return CollectResult(
        raw_path, len(raw), counts, file_md5(raw_path), newest, screened, pii_counts=pii
    )


def mask_frame(raw: pd.DataFrame, kinds: Sequence[str]) -> tuple[pd.DataFrame, dict[str, int]]:
    """The raw table with the `kinds` of personal data masked in its texts (pii.mask_raw), and
    how many of each kind were masked. Feedback rows, masked as they were received, come
    through unchanged."""
    if not kinds:
        return raw, {}
    total: Counter[str] = Counter()
    texts = []
    for text in raw["text"]:
        if pd.isna(text):
            texts.append(text)
            continue
        masked, found = mask_raw(str(text), kinds)
        total.update(found)
        texts.append(masked)
    out = raw.copy()
    out["text"] = pd.array(texts, dtype=raw["text"].dtype)
    return out, {kind: total[kind] for kind in kinds if total[kind]}


def standalone(cfg: Config) -> str:
    """The stage without Prefect (`flywheel stage collect`, dvc.yaml): what it wrote."""
    result = collect(cfg)
    return f"collect: {result.rows:,} rows -> {result.raw_path}"


@task(
    name="collect",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_io,
    cache_policy=NO_CACHE,
)
def collect_task(cfg: Config) -> CollectResult:
    """Prefect task: the collect stage (retried only on I/O errors)."""
    return collect(cfg)
