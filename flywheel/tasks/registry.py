"""Register and promote: the exported model as one MLflow model version, moved between aliases
only through explicit gates (docs/decisions/0006).

    register  the export folder (model.onnx, tokenizer, label map) as a pyfunc model from code
              (flywheel/models/mlflow_model.py, nothing pickled), with signature and input
              example; the version is tagged with its lineage (data version, git commit, flow
              run), the ONNX model's test metrics, parity and latency. Artifacts are uploaded and
              checked first and the version is created last, so a failure leaves no version.
    promote   the gates (flywheel/gates.py, params.yaml's `registry` section): candidate and
              champion scored now on the same current test split and compared text by text;
              passing -> alias `champion` (the old champion keeps `previous`); failing -> alias
              `challenger`; either way every gate's estimate, interval and verdict as tags.
    audit     every alias move is appended to the registered model's tags (`flywheel.audit.N`):
              time, alias, from -> to version, metrics, reason and who or what moved it.
"""

from __future__ import annotations

import getpass
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import gates, tracking
from flywheel.config import Config, RegistryConfig
from flywheel.errors import FlywheelError
from flywheel.gates import Check
from flywheel.io import read_parquet, write_json
from flywheel.locks import registry_lock
from flywheel.models.predictor import MODEL_FILE, OnnxPredictor
from flywheel.models.profile import PROFILE_FILE, ReferenceProfile, load_profile
from flywheel.slices import slice_masks
from flywheel.tasks.evaluate import (
    EvaluationReport,
    Metrics,
    SliceMetrics,
    compute_metrics,
    evaluate_model,
    metric_name,
    slice_metrics,
)

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from flywheel.tasks.export import ExportResult
    from flywheel.tasks.prepare import PrepareResult

log = logging.getLogger(__name__)

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
AUDIT_PREFIX = "flywheel.audit."
PROMOTION_TAG = "flywheel.promotion"  # promoted, rejected (by the gates) or rolled-back
ROLLED_BACK = "rolled-back"
REASONS_TAG = "flywheel.promotion.reasons"
# The registered artifact: what the predictor reads, without the fp32 reference copy.
EXPORT_FILES_SKIPPED = ("fp32.onnx", ".flywheel-output")
# The predictor's modules, shipped with every version so that loading needs no flywheel install.
PREDICTOR_MODULES = (
    "__init__.py",
    "errors.py",
    "pii.py",
    "text.py",
    "models/__init__.py",
    "models/bundle.py",
    "models/predictor.py",
)
RUNTIME_REQUIREMENTS = ("mlflow", "onnxruntime", "transformers", "tokenizers", "numpy")


class RegistryError(FlywheelError):
    """A registry operation that cannot be done as asked (unknown version, missing alias...)."""


# --- scores -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scores:
    """A model's scores on one test split: overall and per slice."""

    metrics: Metrics
    slices: list[SliceMetrics]

    @classmethod
    def compute(cls, frame: pd.DataFrame, proba: np.ndarray, labels: Sequence[str]) -> Scores:
        return cls(
            compute_metrics(frame["label"].tolist(), proba, labels),
            slice_metrics(frame, proba, labels),
        )

    def headline(self) -> dict[str, float]:
        return {"test_macro_f1": self.metrics.macro_f1, "test_accuracy": self.metrics.accuracy}


@dataclass(frozen=True)
class Scored:
    """A registered version scored now on a test split: its scores and its answers."""

    version: str
    scores: Scores
    labels: list[str]  # the model's label set
    answers: list[str]  # its label for each row
    predictor: OnnxPredictor


# --- the registry (MLflow) --------------------------------------------------------------------


@dataclass(frozen=True)
class VersionInfo:
    version: str
    aliases: list[str]
    created: str  # ISO time, UTC
    tags: dict[str, str]
    source: str
    run_id: str | None

    def tag_float(self, key: str) -> float | None:
        value = self.tags.get(key)
        return float(value) if value not in (None, "") else None


@dataclass(frozen=True)
class AuditEntry:
    """One alias move."""

    time: str
    alias: str
    from_version: str | None
    to_version: str | None
    reason: str
    actor: str
    metrics: dict[str, float] = field(default_factory=dict)  # of the version moved to
    gates: dict[str, Any] = field(default_factory=dict)  # the settings it was judged by
    estimates: list[str] = field(default_factory=list)  # every gate's figures and verdict

    def line(self) -> str:
        moved = f"{self.alias}: {self.from_version or '-'} -> {self.to_version or '-'}"
        scores = ", ".join(f"{k} {v:.4f}" for k, v in self.metrics.items())
        return f"{self.time}  {moved:<24} by {self.actor}: {self.reason}" + (
            f" [{scores}]" if scores else ""
        )


def _when(millis: int | None) -> str:
    return datetime.fromtimestamp((millis or 0) / 1000, UTC).isoformat(timespec="seconds")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ModelRegistry:
    """One registered model in one MLflow store; every registry call of Flywheel goes here."""

    def __init__(self, uri: str, name: str):
        self.uri, self.name = uri, name
        self.client = tracking.client(uri)

    @classmethod
    def of(cls, cfg: Config) -> ModelRegistry:
        return cls(tracking.tracking_uri(cfg.root), cfg.registry.model_name)

    def _model_or_none(self) -> Any:
        """The registered model (aliases, tags), or None before the first registration."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(self.name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return None

    def _model(self) -> Any:
        model = self._model_or_none()
        if model is None:
            raise RegistryError(
                f"no registered model {self.name!r} in {tracking.display_uri(self.uri)}: run "
                "`flywheel run` first"
            )
        return model

    @staticmethod
    def _aliases_of(model: Any) -> dict[str, str]:
        return {alias: str(v) for alias, v in model.aliases.items()}

    def aliases(self) -> dict[str, str]:
        """Alias -> version number (as text)."""
        model = self._model_or_none()
        return {} if model is None else self._aliases_of(model)

    def _info(self, mv: ModelVersion, aliases: dict[str, str] | None = None) -> VersionInfo:
        # Searching versions does not fill in their aliases: they come from the model.
        aliases = self.aliases() if aliases is None else aliases
        return VersionInfo(
            str(mv.version),
            sorted(a for a, v in aliases.items() if v == str(mv.version)),
            _when(mv.creation_timestamp),
            dict(mv.tags or {}),
            mv.source,
            mv.run_id,
        )

    def versions(self) -> list[VersionInfo]:
        """Every version, newest first."""
        model = self._model_or_none()
        if model is None:
            return []
        found = self.client.search_model_versions(f"name = '{self.name}'")
        aliases = self._aliases_of(model)
        return sorted((self._info(mv, aliases) for mv in found), key=lambda v: -int(v.version))

    def alias(self, alias: str) -> str | None:
        """The version an alias points at, or None."""
        return self.aliases().get(alias)

    def version(self, ref: str) -> VersionInfo:
        """A version by number or alias (`3`, `champion`)."""
        aliases = self._aliases_of(self._model())  # a clear error when nothing is registered
        number = aliases.get(ref, ref)
        if not number.isdigit():
            known = ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
            raise RegistryError(
                f"{ref!r} is neither a version number nor an alias (aliases: {known})"
            )
        from mlflow.exceptions import MlflowException

        try:
            return self._info(self.client.get_model_version(self.name, number), aliases)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise RegistryError(f"{self.name} has no version {number}") from None

    def register(
        self, export_dir: Path, run: tracking.RunRef, tags: dict[str, str], description: str
    ) -> VersionInfo:
        """The export folder as a new version. Artifacts are uploaded and verified before the
        version exists; any failure leaves the registry as it was (no version, no alias)."""
        from mlflow.exceptions import MlflowException

        with tempfile.TemporaryDirectory(prefix="flywheel-register-") as tmp:
            staged = _save_pyfunc(export_dir, Path(tmp))
            logged = self.client.create_logged_model(
                run.experiment_id, name="model", source_run_id=run.run_id
            )
            try:
                self.client.log_model_artifacts(logged.model_id, str(staged))
                self._verify(logged.artifact_location, staged)
            except BaseException:
                self.client.finalize_logged_model(logged.model_id, "FAILED")
                raise
            self.client.finalize_logged_model(logged.model_id, "READY")
        try:
            self.client.create_registered_model(self.name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        mv = self.client.create_model_version(
            self.name,
            source=logged.artifact_location,
            run_id=run.run_id,
            tags=tags,
            description=description,
            model_id=logged.model_id,
        )
        return self._info(mv)

    def _verify(self, artifact_uri: str, staged: Path) -> None:
        """Every staged file arrived, with its size: a partial upload is not a model."""
        import mlflow.artifacts

        local = {
            p.relative_to(staged).as_posix(): p.stat().st_size
            for p in staged.rglob("*")
            if p.is_file()
        }
        remote: dict[str, int | None] = {}
        pending = [""]
        while pending:
            prefix = pending.pop()
            for item in mlflow.artifacts.list_artifacts(
                artifact_uri=f"{artifact_uri}/{prefix}".rstrip("/"), tracking_uri=self.uri
            ):
                path = f"{prefix}/{Path(item.path).name}".lstrip("/")
                if item.is_dir:
                    pending.append(path)
                else:
                    remote[path] = item.file_size
        missing = sorted(p for p, size in local.items() if remote.get(p) != size)
        if missing:
            raise RegistryError(
                f"the upload to {artifact_uri} is incomplete ({len(missing)} of {len(local)} "
                f"files missing or truncated, e.g. {missing[0]}): nothing was registered"
            )

    def download(self, version: str, dst: Path, path: str = "") -> Path:
        """The version's export folder (model, tokenizer, reference profile), or one file of it,
        downloaded under `dst`."""
        import mlflow.artifacts

        source = self.version(version).source
        uri = f"{source}/artifacts/onnx" + (f"/{path}" if path else "")
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(dst), tracking_uri=self.uri
            )
        )

    def load(self, version: str) -> OnnxPredictor:
        """The version's ONNX model with its tokenizer, through the shared predictor."""
        with tempfile.TemporaryDirectory(prefix="flywheel-model-") as tmp:
            # the session and tokenizer are in memory once constructed
            return OnnxPredictor(self.download(version, Path(tmp)))

    def reference(self, version: str) -> ReferenceProfile | None:
        """The version's reference profile (None for a model exported before profiles)."""
        import mlflow.artifacts

        folder = f"{self.version(version).source}/artifacts/onnx"
        listed = mlflow.artifacts.list_artifacts(artifact_uri=folder, tracking_uri=self.uri)
        if PROFILE_FILE not in {Path(item.path).name for item in listed}:
            return None
        with tempfile.TemporaryDirectory(prefix="flywheel-profile-") as tmp:
            return load_profile(self.download(version, Path(tmp), PROFILE_FILE).parent)

    def promoted_at(self, version: str) -> str | None:
        """When the version last became champion (from the audit log), or None."""
        moves = [e for e in self.history() if e.alias == CHAMPION and e.to_version == version]
        return moves[-1].time if moves else None

    def set_tags(self, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, value)

    def delete_tags(self, version: str, keys: Sequence[str]) -> None:
        """Best effort (used while undoing a failed step)."""
        for key in keys:
            try:
                self.client.delete_model_version_tag(self.name, version, key)
            except Exception as exc:
                log.error("registry: could not delete tag %s of version %s: %s", key, version, exc)

    def history(self) -> list[AuditEntry]:
        """Every alias move, oldest first."""
        model = self._model_or_none()
        if model is None:
            return []
        tags = model.tags
        keys = sorted(k for k in tags if k.startswith(AUDIT_PREFIX))  # keys sort by time
        return [AuditEntry(**json.loads(tags[k])) for k in keys]

    def move(
        self,
        moves: Sequence[tuple[str, str | None]],
        reason: str,
        actor: str,
        metrics: dict[str, float] | None = None,
        gates: dict[str, Any] | None = None,
        estimates: Sequence[str] = (),
    ) -> list[AuditEntry]:
        """Point each alias at a version (None: remove it), all or nothing, each move logged.

        The audit entries are written first and `champion` is moved last, so no failure can
        leave the champion moved without its entry; on a failure every alias is put back and
        the entries written are deleted (best effort: the original error is what is raised).
        """
        before = self.aliases()
        entries = [
            AuditEntry(
                _now(),
                alias,
                before.get(alias),
                to,
                reason[:1000],
                actor,
                metrics or {},
                gates or {},
                list(estimates),
            )
            for alias, to in moves
            if before.get(alias) != to
        ]
        written: list[str] = []
        try:
            for entry in entries:
                # unique per entry and sortable by time: concurrent writers cannot collide
                stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
                key = f"{AUDIT_PREFIX}{stamp}-{uuid.uuid4().hex[:8]}"
                self.client.set_registered_model_tag(self.name, key, json.dumps(asdict(entry)))
                written.append(key)
            for entry in sorted(entries, key=lambda e: e.alias == CHAMPION):
                if entry.to_version is None:
                    self.client.delete_registered_model_alias(self.name, entry.alias)
                else:
                    self.client.set_registered_model_alias(self.name, entry.alias, entry.to_version)
        except BaseException:
            self._restore(before, [e.alias for e in entries], written)
            raise
        return entries

    def _restore(self, aliases: dict[str, str], moved: Sequence[str], keys: list[str]) -> None:
        """Put aliases back and delete audit entries; each step on its own, failures logged."""
        steps = [
            (lambda a=alias: self.client.set_registered_model_alias(self.name, a, aliases[a]))
            if alias in aliases
            else (lambda a=alias: self.client.delete_registered_model_alias(self.name, a))
            for alias in moved
        ] + [(lambda k=key: self.client.delete_registered_model_tag(self.name, k)) for key in keys]
        for step in steps:
            try:
                step()
            except Exception as exc:  # keep restoring; the caller re-raises the first error
                log.error("registry: could not undo a step of a failed alias move: %s", exc)


def _save_pyfunc(export_dir: Path, staging: Path) -> Path:
    """The export folder as a local MLflow pyfunc model (models-from-code) in `staging/model`."""
    import mlflow.pyfunc

    import flywheel

    onnx_dir, code_dir = staging / "onnx", staging / "code" / "flywheel"
    onnx_dir.mkdir()
    for item in export_dir.iterdir():
        if item.is_file() and item.name not in EXPORT_FILES_SKIPPED:
            shutil.copy2(item, onnx_dir / item.name)
    if not (onnx_dir / MODEL_FILE).is_file():
        raise RegistryError(f"{export_dir} has no {MODEL_FILE}: nothing to register")
    package = Path(flywheel.__file__).parent
    for module in PREDICTOR_MODULES:
        (code_dir / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(package / module, code_dir / module)
    out = staging / "model"
    with warnings.catch_warnings():
        # The output maps labels to probabilities; MLflow notes that it cannot check `Any`.
        warnings.filterwarnings("ignore", message=".*Any type hint is inferred as AnyType")
        mlflow.pyfunc.save_model(
            str(out),
            python_model=str(package / "models" / "mlflow_model.py"),
            artifacts={"onnx": str(onnx_dir)},
            code_paths=[str(code_dir)],
            input_example=["A wonderful, moving film."],
            pip_requirements=[
                f"{name}=={importlib.metadata.version(name)}" for name in RUNTIME_REQUIREMENTS
            ],
        )
    return out


# --- promotion ----------------------------------------------------------------------------------

GATE_TAG_PREFIX = "flywheel.gate."  # one version tag per gate: "pass: ..." or "FAIL: ..."


@dataclass(frozen=True)
class Decision:
    """What the gates said about one version and what moved."""

    version: str
    promoted: bool
    checks: list[Check]
    champion_before: str | None
    champion_scores: dict[str, float]  # the champion re-scored on the current test split
    forced: bool = False
    moves: list[AuditEntry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # estimates reported, not judged
    paired: gates.Paired | None = None  # the text-by-text comparison with the champion

    @property
    def reasons(self) -> list[str]:
        return [c.detail for c in self.checks if not c.passed]

    @property
    def already_champion(self) -> bool:
        """The version was champion before this decision (nothing judged, nothing moved)."""
        return self.promoted and not self.moves and self.champion_before == self.version

    def gate_lines(self) -> list[str]:
        """Every gate with its figures and verdict, then what was reported but not judged."""
        return gates.lines(self.checks, self.notes)

    def summary(self) -> str:
        if self.already_champion:
            return f"version {self.version} is already champion (promoted by an earlier run)"
        before = f"champion was {self.champion_before}" if self.champion_before else "no champion"
        if self.promoted:
            how = "forced past the gates" if self.forced else "all gates passed"
            return f"version {self.version} is champion ({how}; {before})"
        outcome = "is challenger" if self.moves else "is not promoted"
        return f"version {self.version} {outcome} ({before}): " + "; ".join(self.reasons)


def gate_tags(checks: Sequence[Check]) -> dict[str, str]:
    """Each gate's verdict as a version tag, e.g. flywheel.gate.overall.accuracy."""
    return {
        GATE_TAG_PREFIX + metric_name(c.name.replace("=", "_")).replace(" ", "."): c.line()[:5000]
        for c in checks
    }


def promote(
    registry: ModelRegistry,
    verdict: gates.Verdict,
    version: str,
    metrics: dict[str, float],
    champion_scores: dict[str, float],
    rc: RegistryConfig,
    reason: str,
    actor: str,
    *,
    force: bool = False,
    challenger_on_fail: bool = True,
) -> Decision:
    """Move the aliases on the gates' verdict: champion (+ previous) when they pass or `force`,
    otherwise challenger (when `challenger_on_fail`); the verdict of every gate goes into the
    version's tags and the audit entries."""
    aliases = registry.aliases()
    before = aliases.get(CHAMPION)
    failed = "; ".join(verdict.reasons)
    passed = verdict.passed

    def decision(moves: list[AuditEntry], promoted: bool) -> Decision:
        return Decision(
            version,
            promoted,
            verdict.checks,
            before,
            champion_scores,
            promoted and not passed,
            moves,
            verdict.notes,
            verdict.paired,
        )

    v = version
    promoted = passed or force
    if promoted:
        moves: list[tuple[str, str | None]] = [(CHAMPION, v)]
        if before is not None and before != v:
            moves.append((PREVIOUS, before))
        if aliases.get(CHALLENGER) == v:
            moves.append((CHALLENGER, None))
        why = reason if passed else f"{reason} (forced; failed gates: {failed})"
        tags = {PROMOTION_TAG: "promoted", REASONS_TAG: why[:5000]}
    elif challenger_on_fail:
        moves = [(CHALLENGER, v)]
        why = f"{reason}: gates failed: {failed}"
        tags = {PROMOTION_TAG: "rejected", REASONS_TAG: failed[:5000]}
    else:
        return decision([], False)
    tags |= gate_tags(verdict.checks)
    previous_tags = registry.version(v).tags
    stale = [k for k in previous_tags if k.startswith(GATE_TAG_PREFIX) and k not in tags]
    registry.set_tags(v, tags)  # before the move: a moved alias always has its reasons
    try:
        registry.delete_tags(v, stale)  # an earlier decision's gates that this one did not run
        entries = registry.move(
            moves,
            why,
            actor,
            metrics,
            rc.model_dump(exclude={"model_name"}),
            verdict.lines(),
        )
    except BaseException:
        registry.delete_tags(v, [k for k in tags if k not in previous_tags])
        restored = {*tags, *stale}
        registry.set_tags(v, {k: previous_tags[k] for k in restored if k in previous_tags})
        raise
    return decision(entries, promoted)


def score_version(registry: ModelRegistry, version: str, frame: pd.DataFrame) -> Scored:
    """A registered version scored on `frame` now (stale tags do not count)."""
    predictor = registry.load(version)
    proba = predictor.predict_proba(frame["text"].tolist())
    answers = np.asarray(predictor.labels)[proba.argmax(axis=1)].tolist()
    scores = Scores.compute(frame, proba, predictor.labels)
    return Scored(version, scores, list(predictor.labels), answers, predictor)


def rescore_champion(
    champion: str | None, score: Callable[[], Scored]
) -> tuple[Scored | None, str | None]:
    """The champion scored now, or why it could not be (missing artifacts, labels that no
    longer match the data...): a reason for the gates, not a crash after registration."""
    if champion is None:
        return None, None
    try:
        return score(), None
    except Exception as exc:
        log.warning("registry: champion %s could not be re-scored: %s", champion, exc)
        return None, f"champion {champion} could not be re-scored on the test split: {exc}"


def paired(
    candidate: Scored, champion: Scored, frame: pd.DataFrame, cfg: Config
) -> gates.Paired:
    """The two versions' answers on the same rows of `frame`, compared by the gates' rule."""
    return gates.compare(
        frame["label"].tolist(),
        candidate.answers,
        champion.answers,
        slice_masks(frame),
        cfg.registry,
        cfg.seed,
        candidate.labels,
        champion.labels,
    )


def judge_version(
    registry: ModelRegistry,
    cfg: Config,
    candidate: Scored,
    p95_ms: float,
    frame: pd.DataFrame,
) -> tuple[gates.Verdict, dict[str, float]]:
    """Every gate on `candidate` against the champion, both scored on `frame`; with the
    champion's headline scores (empty without a champion)."""
    champion = registry.alias(CHAMPION)
    theirs, error = rescore_champion(champion, lambda: score_version(registry, champion, frame))
    comparison = paired(candidate, theirs, frame, cfg) if theirs is not None else None
    verdict = gates.judge(
        gates.Candidate(candidate.version, candidate.scores.metrics.macro_f1, p95_ms),
        comparison,
        cfg.registry,
    )
    if error is not None:
        verdict = replace(
            verdict, checks=[*verdict.checks, Check("champion re-scored", False, error)]
        )
    return verdict, theirs.scores.headline() if theirs is not None else {}


def manual_promotion(
    registry: ModelRegistry,
    cfg: Config,
    ref: str,
    frame: pd.DataFrame,
    reason: str,
    force: bool = False,
) -> Decision:
    """`flywheel models promote`: the pipeline's gates with both models scored on `frame` and
    the candidate's latency measured now; nothing moves when they fail (unless `force`)."""
    from flywheel.tasks.export import measure_latency

    actor = cli_actor("promote")
    with registry_lock(cfg.root, actor):  # the champion judged is the one replaced
        info = registry.version(ref)
        if registry.alias(CHAMPION) == info.version:
            raise RegistryError(f"version {info.version} is already champion")
        candidate = score_version(registry, info.version, frame)
        latency = measure_latency(
            candidate.predictor, frame["text"].tolist()[: cfg.export.latency_texts]
        )
        verdict, champion_scores = judge_version(registry, cfg, candidate, latency.p95_ms, frame)
        return promote(
            registry,
            verdict,
            info.version,
            candidate.scores.headline(),
            champion_scores,
            cfg.registry,
            reason,
            actor,
            force=force,
            challenger_on_fail=False,
        )


def rollback(registry: ModelRegistry, reason: str, actor: str) -> list[AuditEntry]:
    """Champion back to `previous`; the rolled-back version becomes `previous`, so a second
    rollback undoes the first."""
    champion, previous = registry.alias(CHAMPION), registry.alias(PREVIOUS)
    if previous is None:
        raise RegistryError(
            f"{registry.name} has no `previous` version to roll back to "
            f"(champion: {champion or 'none'}); see `flywheel models history`"
        )
    info = registry.version(previous)  # its scores as registered (rollback re-scores nothing)
    scores = {f"test_{m}": info.tag_float(f"flywheel.test.{m}") for m in ("macro_f1", "accuracy")}
    metrics = {name: value for name, value in scores.items() if value is not None}
    # The pipeline does not promote a rolled-back version again by itself (promote_task). The
    # tags go first, as in promote(), and are put back if the aliases cannot move.
    tags = {
        champion: {PROMOTION_TAG: ROLLED_BACK, REASONS_TAG: reason[:5000]},
        previous: {PROMOTION_TAG: "promoted"},
    }
    before = {v: registry.version(v).tags for v in tags}
    for version, values in tags.items():
        registry.set_tags(version, values)
    try:
        return registry.move([(CHAMPION, previous), (PREVIOUS, champion)], reason, actor, metrics)
    except BaseException:
        for version, values in tags.items():
            registry.delete_tags(version, [k for k in values if k not in before[version]])
            registry.set_tags(
                version, {k: before[version][k] for k in values if k in before[version]}
            )
        raise


@dataclass(frozen=True)
class Comparison:
    """Two versions scored on the same test split."""

    a: str
    b: str
    rows: int
    metrics: dict[str, tuple[float, float]]  # name -> (a, b)
    per_class: dict[str, tuple[float, float]]  # label -> F1 (a, b)
    slices: dict[str, tuple[float, float, int]]  # slice -> accuracy (a, b), rows
    disagree: int  # texts on which the two labels differ
    disagreements: list[dict[str, str]]  # the first `limit` of them: text, label, a, b
    verdict: gates.Verdict  # the gates on B as candidate, A as champion (latency not measured)


def compare_versions(
    registry: ModelRegistry, cfg: Config, a: str, b: str, frame: pd.DataFrame, limit: int = 20
) -> Comparison:
    """Score versions `a` and `b` (numbers or aliases) on `frame`; list where they disagree and
    judge B against A by the promotion gates' paired comparison."""
    va, vb = registry.version(a), registry.version(b)
    texts = frame["text"].tolist()
    sa, sb = (score_version(registry, v.version, frame) for v in (va, vb))
    pred_a, pred_b = np.asarray(sa.answers), np.asarray(sb.answers)
    differ = np.flatnonzero(pred_a != pred_b)
    keys = ("accuracy", "macro_f1", "weighted_f1", "roc_auc", "ece")
    slices_b = {s.slice: s for s in sb.scores.slices}
    verdict = gates.judge(
        gates.Candidate(sb.version, sb.scores.metrics.macro_f1, None),  # latency not measured
        paired(sb, sa, frame, cfg),
        cfg.registry,
    )
    return Comparison(
        va.version,
        vb.version,
        len(frame),
        {k: (getattr(sa.scores.metrics, k), getattr(sb.scores.metrics, k)) for k in keys},
        {
            label: (m.f1, sb.scores.metrics.per_class[label].f1)
            for label, m in sa.scores.metrics.per_class.items()
            if label in sb.scores.metrics.per_class
        },
        {
            s.slice: (s.accuracy, slices_b[s.slice].accuracy, s.rows)
            for s in sa.scores.slices
            if s.slice in slices_b
        },
        len(differ),
        [
            {"text": texts[i], "label": str(frame["label"].iloc[i]), "a": pred_a[i], "b": pred_b[i]}
            for i in differ[:limit]
        ],
        verdict,
    )


def cli_actor(command: str) -> str:
    """Who moved an alias from the command line (the OS user; the uid when it has no name)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container uid without a passwd entry
        user = f"uid {os.getuid()}"
    return f"{user} via flywheel models {command}"


# --- flow tasks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registered:
    """A registered version and the scores it was registered with."""

    name: str
    version: str
    report: EvaluationReport  # the ONNX model on the test split
    report_dir: Path
    p95_ms: float
    run_id: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def version_tags(
    lineage: tracking.Lineage, exported: ExportResult, report: EvaluationReport, pipeline_run: str
) -> dict[str, str]:
    """What a version is made of and how good it is, as registry tags."""
    m = report.metrics
    tags = {
        "flywheel.data_version": lineage.data_version,
        "flywheel.git_commit": lineage.git_commit,
        "flywheel.git_dirty": str(lineage.git_dirty).lower(),
        "flywheel.flow_run_id": lineage.flow_run_id or "none",
        tracking.FEEDBACK_SEQ_TAG: str(lineage.feedback_seq),
        "flywheel.mlflow_run_id": pipeline_run,
        "flywheel.variant": exported.chosen,
        "flywheel.size_mb": f"{(exported.directory / MODEL_FILE).stat().st_size / 1e6:.1f}",
        "flywheel.test.rows": str(m.rows),
        "flywheel.test.accuracy": f"{m.accuracy:.6f}",
        "flywheel.test.macro_f1": f"{m.macro_f1:.6f}",
        "flywheel.test.weighted_f1": f"{m.weighted_f1:.6f}",
        "flywheel.test.ece": f"{m.ece:.6f}",
        "flywheel.parity.passed": str(exported.parity_passed).lower(),
        "flywheel.parity.fp32_max_logit_diff": f"{exported.fp32_max_logit_diff:.3e}",
        "flywheel.latency.p50_ms": f"{exported.latency.p50_ms:.2f}",
        "flywheel.latency.p95_ms": f"{exported.latency.p95_ms:.2f}",
    }
    if m.roc_auc is not None:
        tags["flywheel.test.roc_auc"] = f"{m.roc_auc:.6f}"
    if exported.test is not None:
        tags |= {
            "flywheel.parity.test_agreement": f"{exported.test.agreement:.6f}",
            "flywheel.parity.test_accuracy_loss": f"{exported.test.accuracy_loss:.6f}",
            "flywheel.parity.test_macro_f1_loss": f"{exported.test.macro_f1_loss:.6f}",
        }
    return tags


@task(name="register", cache_policy=NO_CACHE)
def register_task(
    cfg: Config, prepared: PrepareResult, exported: ExportResult, parent: tracking.RunRef
) -> Registered:
    """Score the exported model on test through the ONNX predictor, then register it."""
    test = read_parquet(prepared.split_paths["test"])
    registry = ModelRegistry(parent.uri, cfg.registry.model_name)
    with tracking.stage_run(cfg, "register", parent) as run:
        report, folder = evaluate_model(cfg, OnnxPredictor(exported.directory), test, "onnx")
        tracking.log_scalars(run, report.scalars())
        tracking.log_artifacts(run, folder)
        info = registry.register(
            exported.directory,
            run,
            version_tags(parent.lineage, exported, report, parent.run_id),
            f"{exported.chosen} ONNX model, data version {parent.lineage.data_version}",
        )
        tracking.set_tags(
            run, {"flywheel.model_name": registry.name, "flywheel.model_version": info.version}
        )
    return Registered(
        registry.name,
        info.version,
        report,
        folder,
        exported.latency.p95_ms,
        run.run_id,
    )


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(
    cfg: Config,
    prepared: PrepareResult,
    registered: Registered,
    parent: tracking.RunRef,
    actor: str,
) -> Decision:
    """Re-score the champion on the current test split, run the gates, move the aliases."""
    test = read_parquet(prepared.split_paths["test"])
    registry = ModelRegistry(parent.uri, cfg.registry.model_name)
    with tracking.stage_run(cfg, "promote", parent) as run, registry_lock(cfg.root, actor):
        champion = registry.alias(CHAMPION)
        if champion == registered.version:  # a reused registration, promoted by an earlier run
            decision = Decision(registered.version, True, [], champion, {})
        elif registry.version(registered.version).tags.get(PROMOTION_TAG) == ROLLED_BACK:
            why = (
                f"version {registered.version} was rolled back; the pipeline does not promote "
                f"it again (by hand: flywheel models promote {registered.version})"
            )
            decision = Decision(
                registered.version, False, [Check("not rolled back", False, why)], champion, {}
            )
        else:
            candidate = score_version(registry, registered.version, test)
            verdict, champion_scores = judge_version(
                registry, cfg, candidate, registered.p95_ms, test
            )
            decision = promote(
                registry,
                verdict,
                registered.version,
                candidate.scores.headline(),
                champion_scores,
                cfg.registry,
                reason=f"new version from the pipeline (data {parent.lineage.data_version})",
                actor=actor,
            )
        tracking.log_scalars(
            run,
            {"promoted": float(decision.promoted)}
            | {f"champion_{k}": v for k, v in decision.champion_scores.items()},
        )
        tracking.set_tags(
            run,
            {
                "flywheel.model_version": registered.version,
                PROMOTION_TAG: "promoted" if decision.promoted else "rejected",
            },
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "decision.json"
            write_json(
                path,
                asdict(decision) | {"reasons": decision.reasons, "gates": decision.gate_lines()},
            )
            tracking.log_artifacts(run, path)
    return decision
