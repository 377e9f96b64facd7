"""The MLflow model-registry client: one registered model's versions, aliases, tags and audit
log. Every registry call of Flywheel goes through `ModelRegistry`. A version is created only after
its artifacts are uploaded and checked, and an alias move writes its audit entry before it moves
`champion`, undoing every step on a failure (why: docs/decisions/0006). The promotion policy that
decides the moves is flywheel/promotion.py.
"""

from __future__ import annotations

import json
import logging
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flywheel import tracking
from flywheel.config import Config
from flywheel.errors import FlywheelError
from flywheel.models.predictor import MODEL_FILE, OnnxPredictor
from flywheel.models.profile import PROFILE_FILE, ReferenceProfile, load_profile

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
AUDIT_PREFIX = "flywheel.audit."
PROMOTION_TAG = "flywheel.promotion"  # promoted, rejected (by the gates) or rolled-back
ROLLED_BACK = "rolled-back"
REASONS_TAG = "flywheel.promotion.reasons"
GATE_TAG_PREFIX = "flywheel.gate."  # one version tag per gate: "pass: ..." or "FAIL: ..."


class RegistryError(FlywheelError):
    """A registry operation that cannot be done as asked (unknown version, missing alias...)."""


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

    @tracking.store_call
    def register(
        self, export_dir: Path, run: tracking.RunRef, tags: dict[str, str], description: str
    ) -> VersionInfo:
        """The export folder as a new version. Artifacts are uploaded and verified before the
        version exists; any failure leaves the registry as it was (no version, no alias). A
        store that is locked or read-only is tried again, then it and a full one raise
        tracking.TrackingStoreError."""
        from mlflow.exceptions import MlflowException

        from flywheel.models.mlflow_model import save_pyfunc  # imports mlflow.pyfunc: not cheap

        if not (export_dir / MODEL_FILE).is_file():
            raise RegistryError(f"{export_dir} has no {MODEL_FILE}: nothing to register")
        with tempfile.TemporaryDirectory(prefix="flywheel-register-") as tmp:
            staged = save_pyfunc(export_dir, Path(tmp))
            logged = self.client.create_logged_model(
                run.experiment_id, name="model", source_run_id=run.run_id
            )
            try:
                self.client.log_model_artifacts(logged.model_id, str(staged))
                self._verify(logged.artifact_location, staged)
            except BaseException:
                try:
                    self.client.finalize_logged_model(logged.model_id, "FAILED")
                except Exception as exc:  # the store failing too must not hide the first cause
                    log.warning("could not mark logged model %s FAILED: %s", logged.model_id, exc)
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
