"""Validate: the Great Expectations gate between collection and cleaning.

One suite (`build_suite`) for the flow, `flywheel validate` and the tests; checks GX has no
built-in for are derived columns (`add_check_columns`) that standard expectations bound. The
data-set checks judge every row but feedback (`judged_by_set_checks`). What it checks:
docs/data.md; why feedback is judged apart: docs/decisions/0010-feedback-hygiene.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import feedback
from flywheel.config import Config, ValidateConfig
from flywheel.errors import FlywheelError
from flywheel.io import file_md5, read_parquet, replace_dir_atomic, write_json
from flywheel.stages import StageSpec
from flywheel.tasks.collect import CollectResult
from flywheel.text import normalised_key

STAGE = StageSpec(
    name="validate",
    module=__name__,
    reads=("validate",),
    artifacts=("report_dir",),  # checks.json: what prepare verifies
    keyed_on="raw",
    standalone="standalone",
)

log = logging.getLogger(__name__)

EXAMPLES = 5  # example rows per failed expectation in the printed summary
ROW_ID = "origin"
CHECKS_FILE = "checks.json"
SHOWN = ("label", "text")  # columns shown for each example row, when present


class DataNotValidatedError(FlywheelError):
    """Prepare was asked to run on raw data without a passing validation of exactly that data."""


class DataValidationError(FlywheelError):
    """Raised when the data fails the suite; carries the report (summary + where it was written)."""

    def __init__(self, report: ValidationReport):
        super().__init__(report.summary(examples=False))
        self.report = report


@dataclass(frozen=True)
class Failure:
    """One failed expectation: what was expected, how many rows broke it, a few of them."""

    description: str
    expectation: str
    column: str | None
    unexpected_count: int | None
    observed: Any
    examples: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None
    fix: str | None = None  # the setting (and value) that would accept the data, or the action


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of one validation: pass/fail, failures, and where the full result was written."""

    success: bool
    rows: int
    evaluated: int
    failures: list[Failure]
    report_dir: Path
    feedback_rows: int = 0  # held to the row checks only
    sources: tuple[str, ...] = ()  # where the rows came from (files, the embedded set, feedback)

    @property
    def result_path(self) -> Path:
        return self.report_dir / "result.json"

    @property
    def docs_path(self) -> Path:
        return self.report_dir / "docs" / "index.html"

    @property
    def headline(self) -> str:
        """One line: passed or failed, rows, expectations met."""
        where = ""
        if self.sources:
            shown = self.sources if len(self.sources) <= 3 else (*self.sources[:3], "...")
            where = f" from {', '.join(shown)}"
        return (
            f"validation {'passed' if self.success else 'FAILED'}: {self.rows:,} rows{where}, "
            f"{self.evaluated - len(self.failures)}/{self.evaluated} expectations met"
        )

    def checks(self, data_md5: str | None) -> dict[str, Any]:
        """The reproducible outcome: same data and suite, same bytes (no times, no paths)."""
        return {
            "data_md5": data_md5,
            "success": self.success,
            "rows": self.rows,
            "evaluated": self.evaluated,
            "failures": [
                {
                    "expectation": f.description,
                    "unexpected_count": f.unexpected_count,
                    "observed": f.observed,
                    "error": f.error,
                }
                for f in self.failures
            ],
        }

    def summary(self, examples: bool = True) -> str:
        """A readable summary: which expectation failed, how many rows, example rows."""
        lines = [self.headline]
        if self.feedback_rows:
            lines.append(
                f"  {self.feedback_rows:,} feedback rows: row checks only; class sizes, imbalance "
                f"and repeats judge the other {self.rows - self.feedback_rows:,} rows"
            )
        for f in self.failures:
            count = f" ({f.unexpected_count:,} of {self.rows:,} rows)" if f.unexpected_count else ""
            lines.append(f"  x {f.description}{count}")
            if f.error:
                lines.append(f"      not evaluated: {f.error}")
            elif f.observed is not None:
                lines.append(f"      observed: {f.observed}")
            if f.fix:
                lines.append(f"      fix: {f.fix}")
            for ex in f.examples if examples else []:
                shown = ", ".join(f"{k} {v}" for k, v in ex.items() if k != "row")
                lines.append(f"      row {ex['row']}: {shown}")
        lines.append(f"  full result: {self.result_path}")
        lines.append(f"  data docs:   {self.docs_path}")
        return "\n".join(lines)


def judged_by_set_checks(frame: pd.DataFrame) -> pd.Series:
    """True for the rows the data-set checks judge: all but feedback rows."""
    if "source" not in frame.columns:
        return pd.Series(True, index=frame.index)
    return (frame["source"] != feedback.SOURCE).fillna(True).astype(bool)


def add_check_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Derived columns the suite bounds: stripped length, repeats, class sizes and imbalance.

    The data-set columns (repeats, class sizes, imbalance) are null on feedback rows, which GX
    leaves out of those checks: they are computed over the other rows only."""
    out = frame.copy()
    if ROW_ID not in out.columns:
        out[ROW_ID] = [str(i) for i in range(1, len(out) + 1)]
    judged = judged_by_set_checks(out)
    if "text" in out.columns:
        text = out["text"].astype("string")
        out["text_stripped_len"] = text.str.strip().str.len()
        key = text[judged].map(normalised_key, na_action="ignore")
        repeats = pd.Series(pd.NA, index=out.index, dtype="boolean")
        repeats[judged] = key.notna() & key.duplicated()
        out["text_repeats"] = repeats
    if "label" in out.columns:
        out["label_variant"] = label_variants(out["label"].where(judged))
        sizes = out[judged].groupby("label", dropna=True)["label"].transform("size")
        out["label_rows"] = sizes.reindex(out.index)
        imbalance = sizes.max() / sizes if len(sizes.dropna()) else sizes
        out["label_imbalance"] = imbalance.reindex(out.index)
    return out


def label_key(label: str) -> str:
    """A label's spelling-insensitive key: case-folded, spacing collapsed."""
    return " ".join(str(label).casefold().split())


def label_variants(labels: pd.Series) -> pd.Series:
    """True for rows whose label is a rarer spelling of another label ('Pos ' beside 'pos'); the
    most frequent spelling of each key is the reference. Nulls (feedback rows) are null."""
    counts = labels.dropna().value_counts()
    reference: dict[str, str] = {}
    for label in counts.index:  # most frequent first
        reference.setdefault(label_key(label), label)
    flags = labels.map(lambda v: reference[label_key(v)] != v, na_action="ignore")
    return flags.astype("boolean")


def with_fix(failure: Failure, checked: pd.DataFrame) -> Failure:
    """The failure with what would accept the data: the setting and the value the data needs,
    or what to change in the source."""
    return replace(failure, fix=_fix(failure, checked[judged_by_set_checks(checked)]))


def setting(key: str, value: object) -> str:
    """How to set validate.`key` to `value`: in params.yaml or for one run."""
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"set validate.{key}: {shown} in params.yaml (or --set validate.{key}={shown})"


def _fix(failure: Failure, rows: pd.DataFrame) -> str | None:
    column, kind = failure.column, failure.expectation
    if failure.error or kind == "expect_column_to_exist":
        return "name the text and label columns with --text-col / --label-col (data.sources)"
    if kind == "expect_column_values_to_not_be_null" or (column == "label" and "length" in kind):
        return f"fill in or remove the rows without a {column} in the source"
    if column == "text_stripped_len":
        return "remove the blank texts from the source (validate.min_text_chars is at least 1)"
    if column == "text":
        longest = int(rows["text"].astype("string").str.len().max())
        return (
            f"{setting('max_text_chars', longest)} (the longest text), or shorten or drop the "
            "long texts"
        )
    if column == "label" and kind == "expect_column_unique_value_count_to_be_between":
        found = rows["label"].nunique()
        if found < 2:
            return "a classifier needs at least 2 labels: add rows with another label"
        return f"{setting('min_classes', found)}, or add rows with other labels"
    if column == "label_rows":
        sizes = rows["label"].value_counts()
        return (
            f"{setting('min_rows_per_class', int(sizes.min()))} (label {sizes.idxmin()!r} has "
            f"{int(sizes.min())} rows), or add rows of the small labels, or drop them"
        )
    if column == "label_imbalance":
        ratio = math.ceil(float(rows["label_imbalance"].max()) * 100) / 100
        return (
            f"{setting('max_class_imbalance', ratio)}, or add rows of the small labels (the "
            "loss is not weighted by class)"
        )
    if column == "text_repeats":
        share = math.ceil(float(rows["text_repeats"].astype(float).mean()) * 1000) / 1000
        return (
            f"{setting('max_duplicate_rate', share)} (repeats are dropped before training), or "
            "remove them from the source"
        )
    if column == "label_variant":
        groups: dict[str, set[str]] = {}
        for label in rows["label"].dropna().unique():
            groups.setdefault(label_key(label), set()).add(label)
        spelled = [" / ".join(repr(v) for v in sorted(g)) for g in groups.values() if len(g) > 1]
        return f"spell each label one way in the source: {'; '.join(spelled)}"
    if column == "label":
        found = sorted(map(str, rows["label"].dropna().unique()))
        shown = ", ".join(found[:20]) + (", ..." if len(found) > 20 else "")
        return (
            f"set validate.labels: [{shown}] in params.yaml to accept every label found (or "
            "null, or `flywheel run --labels`); or fix the rows' labels"
        )
    return None


def build_suite(cfg: ValidateConfig):
    """The one expectation suite for labelled text, parameterised by the validate config."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name="labelled_text")
    expectations = [
        gxe.ExpectColumnToExist(column="text", description="column 'text' is present"),
        gxe.ExpectColumnToExist(column="label", description="column 'label' is present"),
        gxe.ExpectColumnValuesToNotBeNull(column="text", description="text is not null"),
        gxe.ExpectColumnValuesToNotBeNull(column="label", description="label is not null"),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="label", min_value=1, description="label is not empty"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="text_stripped_len",
            min_value=cfg.min_text_chars,
            description=f"text has at least {cfg.min_text_chars} non-blank character(s)",
        ),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="text",
            max_value=cfg.max_text_chars,
            description=f"text is at most {cfg.max_text_chars:,} characters long",
        ),
        gxe.ExpectColumnUniqueValueCountToBeBetween(
            column="label",
            min_value=cfg.min_classes,
            description=f"at least {cfg.min_classes} distinct labels",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="label_rows",
            min_value=cfg.min_rows_per_class,
            description=f"every label has at least {cfg.min_rows_per_class} rows",
        ),
        gxe.ExpectColumnMaxToBeBetween(
            column="label_imbalance",
            max_value=cfg.max_class_imbalance,
            description=f"largest class is at most {cfg.max_class_imbalance:g}x the smallest",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="label_variant",
            value_set=[False],
            description="no two labels differ only in case or spacing",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="text_repeats",
            value_set=[False],
            mostly=1 - cfg.max_duplicate_rate,
            description=f"at most {cfg.max_duplicate_rate:.1%} of texts repeat an earlier text",
        ),
    ]
    if cfg.labels is not None:
        expectations.append(
            gxe.ExpectColumnValuesToBeInSet(
                column="label",
                value_set=list(cfg.labels),
                description=f"label is one of {', '.join(cfg.labels)}",
            )
        )
    for expectation in expectations:
        suite.add_expectation(expectation)
    return suite


def _context(docs_dir: Path) -> Any:
    """An ephemeral GX context whose data docs go to `docs_dir` (and nowhere else)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    # The ephemeral context makes a temporary docs folder of its own: drop it, use ours.
    for site, site_config in dict(ctx.variables.data_docs_sites or {}).items():
        ctx.delete_data_docs_site(site)
        default_dir = site_config.get("store_backend", {}).get("base_directory")
        if default_dir and Path(default_dir).parent == Path(tempfile.gettempdir()):
            shutil.rmtree(default_dir, ignore_errors=True)
    ctx.add_data_docs_site(
        site_name="flywheel",
        site_config={
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir),
            },
        },
    )
    return ctx


def _checkpoint(ctx: Any, cfg: ValidateConfig, columns: pd.Index) -> Any:
    """The suite over a whole-dataframe batch, as a checkpoint that also builds the data docs."""
    import great_expectations as gx

    batch = (
        ctx.data_sources.add_pandas("flywheel")
        .add_dataframe_asset("rows")
        .add_batch_definition_whole_dataframe("all")
    )
    suite = ctx.suites.add(build_suite(cfg))
    definition = ctx.validation_definitions.add(
        gx.ValidationDefinition(name="labelled_text", data=batch, suite=suite)
    )
    return ctx.checkpoints.add(
        gx.Checkpoint(
            name="flywheel",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="docs")],
            result_format={
                "result_format": "COMPLETE",
                "unexpected_index_column_names": [c for c in (ROW_ID, *SHOWN) if c in columns],
            },
        )
    )


def run_suite(
    frame: pd.DataFrame, cfg: ValidateConfig, report_dir: Path, data_md5: str | None = None
) -> ValidationReport:
    """Validate a table with the suite; write the report folder atomically.

    The folder holds result.json (GX's full result), summary.txt, docs/ (GX data docs) and
    checks.json: the outcome without timestamps or paths, fingerprinted with `data_md5` (the
    validated file's md5), which is what DVC tracks and what `prepare` checks before it runs.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations  # noqa: F401 (imported here: its loggers exist after this)

    # Some GX modules set their own logger to INFO on import: quiet them after importing.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("great_expectations"):
            logging.getLogger(name).setLevel(logging.WARNING)

    checked = add_check_columns(frame)

    def fill(staging: Path) -> ValidationReport:
        checkpoint = _checkpoint(_context(staging / "docs"), cfg, checked.columns)
        outcome = next(
            iter(checkpoint.run(batch_parameters={"dataframe": checked}).run_results.values())
        )
        report = ValidationReport(
            success=bool(outcome.success),
            rows=len(frame),
            evaluated=len(outcome.results),
            failures=[with_fix(_failure(r), checked) for r in outcome.results if not r.success],
            report_dir=report_dir,
            feedback_rows=int((~judged_by_set_checks(frame)).sum()),
            sources=tuple(map(str, frame["source"].dropna().unique()))
            if "source" in frame.columns
            else (),
        )
        write_json(staging / "result.json", outcome.to_json_dict())
        (staging / "summary.txt").write_text(report.summary() + "\n", encoding="utf-8")
        write_json(staging / CHECKS_FILE, report.checks(data_md5))
        return report

    return replace_dir_atomic(report_dir, fill)


def _failure(result) -> Failure:
    config = result.expectation_config
    details = result.result or {}
    error = None
    info = result.exception_info or {}
    if info.get("raised_exception"):
        error = _short_error(info.get("exception_message") or "")
    else:
        for value in info.values():
            if isinstance(value, dict) and value.get("raised_exception"):
                error = _short_error(value.get("exception_message") or "")
                break
    column = config.kwargs.get("column")
    examples = [
        {"row": str(item.get(ROW_ID)), **{c: _clip(item[c]) for c in SHOWN if c in item}}
        for item in (details.get("unexpected_index_list") or [])[:EXAMPLES]
        if isinstance(item, dict)
    ]
    return Failure(
        description=config.description or config.type,
        expectation=config.type,
        column=column,
        unexpected_count=details.get("unexpected_count"),
        observed=details.get("observed_value"),
        examples=examples,
        error=error,
    )


def _short_error(message: str) -> str:
    if "does not exist" in message and "column" in message:
        return (
            message.replace("Error: ", "").replace(" in BatchData", "") + " (see the column check)"
        )
    return message.splitlines()[0] if message else "unknown error"


def _clip(value: Any, width: int = 80) -> str:
    text = "null" if value is None or (isinstance(value, float) and value != value) else repr(value)
    return text if len(text) <= width else f"{text[:width]}... ({len(str(value)):,} chars)"


def validate(cfg: Config, raw_path: Path) -> ValidationReport:
    """Validate stage on the raw table; raises DataValidationError when the data fails."""
    report = run_suite(
        read_parquet(raw_path),
        cfg.validate_,
        cfg.resolve(cfg.validate_.report_dir),
        data_md5=file_md5(raw_path),
    )
    log.info("validate: %s", report.headline)
    if not report.success:
        raise DataValidationError(report)
    return report


def standalone(cfg: Config) -> str:
    """The stage without Prefect (`flywheel stage validate`, dvc.yaml): its summary."""
    return validate(cfg, cfg.resolve(cfg.data.raw_path)).summary()


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(cfg: Config, collected: CollectResult) -> ValidationReport:
    """Prefect task: the GX gate; a failure fails the flow before anything downstream."""
    return validate(cfg, collected.raw_path)


def require_validated(cfg: Config, raw_path: Path) -> None:
    """Stop unless the validate stage passed on exactly this raw table (both runners call it)."""
    checks_path = cfg.resolve(cfg.validate_.report_dir) / CHECKS_FILE
    if not checks_path.is_file():
        raise DataNotValidatedError(f"{raw_path} has not been validated: run the validate stage")
    checks = json.loads(checks_path.read_text(encoding="utf-8"))
    if checks.get("data_md5") != file_md5(raw_path):
        raise DataNotValidatedError(
            f"{checks_path} is for other data than {raw_path}: run the validate stage again"
        )
    if not checks.get("success"):
        raise DataNotValidatedError(
            f"{raw_path} failed validation; see {checks_path.with_name('summary.txt')}"
        )
