"""MLflow tracking, at the edge: every run-tracking call of the pipeline goes through this module
(the model registry client is flywheel/registry.py, on a client from here).

One flow run = one parent run (`pipeline_run`) with a nested run per model stage (`stage_run`),
on a client bound to the project's store (`sqlite:///<root>/mlflow/mlflow.db`, or
MLFLOW_TRACKING_URI), sent with `log_batch`. What each run holds:
docs/registry.md#tracking-in-mlflow; why: docs/decisions/0004-mlflow-run-layout.md.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from flywheel.config import dotted
from flywheel.errors import FlywheelError
from flywheel.io import file_md5

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

    from flywheel.config import Config

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class TrackingTime:
    """Wall time this process spent in MLflow tracking calls: what tracking costs a run.
    `in_tasks` is the part spent inside Prefect task runs (the rest is in flow bodies)."""

    seconds: float = 0.0
    in_tasks: float = 0.0
    calls: int = 0


SPENT = TrackingTime()


@contextmanager
def _timing() -> Iterator[None]:
    # Prefect's context is looked up, never imported: a process without Prefect (the server)
    # cannot be inside a task run, and must not load Prefect to find that out.
    context = sys.modules.get("prefect.context")
    started = time.perf_counter()
    try:
        yield
    finally:
        spent = time.perf_counter() - started
        SPENT.seconds += spent
        SPENT.calls += 1
        if context is not None and context.TaskRunContext.get() is not None:
            SPENT.in_tasks += spent


STORE_ATTEMPTS = 3  # tries of a call the store refused as locked or read-only (full: one)
STORE_BACKOFF_SECONDS = 2.0  # times the attempt number, between tries
KEPT = (
    "nothing is lost locally: the data version and every stage that finished stay in the "
    "project, and the next `flywheel run` reuses them"
)
FIXES = {
    "locked": "another process holds a write lock on it (an `mlflow ui` or `mlflow server` "
    "writing to the same SQLite file, or a stuck process): stop that process, or point "
    "MLFLOW_TRACKING_URI at a tracking server, then run again",
    "read-only": "it is on a read-only file system or not writable: make it writable (check "
    "the mount and permissions), then run again",
    "full": "the disk it writes to is full: free space there (or move mlflow/ to a larger "
    "disk), then run again",
}


class TrackingStoreError(FlywheelError):
    """The MLflow store refused writes (locked, read-only or full) after bounded retries."""

    def __init__(self, problem: str, store: str, tries: int, cause: BaseException):
        reason = _reason(cause)
        super().__init__(
            f"the MLflow store {store} is {problem} ({tries} tr{'y' if tries == 1 else 'ies'}; "
            f"{reason}): {FIXES[problem]}. {KEPT.capitalize()}"
        )
        self.problem = problem


def _reason(cause: BaseException) -> str:
    """The driver's own words (e.g. SQLite's "attempt to write a readonly database") rather
    than the SQL statement or SQLAlchemy's wrapping, which MLflow's message leads with."""
    text = str(cause).strip()
    found = re.search(r"\((?:\w+\.)*\w*Error\) ([^\n\[]+)", text)
    if found:
        return found.group(1).strip()[:300]
    return text.splitlines()[0][:300] if text else repr(cause)


def store_problem(exc: BaseException) -> str | None:
    """ "locked", "read-only" or "full" when `exc` says the store (not the call) failed."""
    if isinstance(exc, TrackingStoreError):
        return None  # already judged by an inner call
    code = exc.errno if isinstance(exc, OSError) else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "full"
    if code == errno.EROFS:
        return "read-only"
    text = str(exc)
    if "database is locked" in text:
        return "locked"
    if "readonly database" in text or "Read-only file system" in text:
        return "read-only"
    if "No space left on device" in text or "database or disk is full" in text:
        return "full"
    return None


def _store_of(args: tuple[Any, ...]) -> str:
    """The store a tracking call writes to, from its arguments (a run, a registry, a URI or the
    project root), fit to print."""
    uris = [getattr(arg, "uri", None) for arg in args]
    uris += [arg for arg in args if isinstance(arg, str) and "://" in arg]
    uris += [tracking_uri(arg) for arg in args if isinstance(arg, Path)]
    found = [uri for uri in uris if isinstance(uri, str)]
    return display_uri(found[0]) if found else "in use"


def store_call(fn: Callable[P, R]) -> Callable[P, R]:
    """A tracking call, timed (SPENT); a store that is locked or read-only is tried again
    (STORE_ATTEMPTS, with backoff), then it and a full one raise TrackingStoreError."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        attempt = 1
        while True:
            try:
                with _timing():
                    return fn(*args, **kwargs)
            except Exception as exc:
                problem = store_problem(exc)
                if problem is None:
                    raise
                if problem == "full" or attempt >= STORE_ATTEMPTS:
                    raise TrackingStoreError(problem, _store_of(args), attempt, exc) from exc
                wait = STORE_BACKOFF_SECONDS * attempt
                log.warning(
                    "the MLflow store %s is %s (try %d of %d): trying again in %.0f s",
                    _store_of(args),
                    problem,
                    attempt,
                    STORE_ATTEMPTS,
                    wait,
                )
                time.sleep(wait)
                attempt += 1

    return wrapper


EXPERIMENT = "flywheel"
BATCH = 100  # MLflow accepts at most 100 params/tags and 1000 metrics per log_batch


FEEDBACK_SEQ_TAG = "flywheel.feedback_seq"


@dataclass(frozen=True)
class Lineage:
    """What a run was made from: data, code and orchestration."""

    data_version: str
    git_commit: str
    git_dirty: bool
    flow_run_id: str | None
    feedback_seq: int = 0  # the newest feedback row in the data (flywheel/feedback.py)

    @classmethod
    def of(
        cls, root: Path, data_version: str, flow_run_id: str | None, feedback_seq: int = 0
    ) -> Lineage:
        """The lineage of a run starting now in the project at `root`."""
        commit, dirty = git_state(root)
        return cls(data_version, commit, dirty, flow_run_id, feedback_seq)

    def tags(self) -> dict[str, str]:
        return {
            "flywheel.data_version": self.data_version,
            "mlflow.source.git.commit": self.git_commit,
            "flywheel.git_dirty": str(self.git_dirty).lower(),
            "flywheel.flow_run_id": self.flow_run_id or "none",
            FEEDBACK_SEQ_TAG: str(self.feedback_seq),
        }


# Files the pipeline itself rewrites: changing them does not make the code dirty.
PIPELINE_OUTPUTS = (":(exclude)dvc.lock", ":(exclude)data/runs")


def git_state(root: Path) -> tuple[str, bool]:
    """(commit, dirty) of the project's code; ("unknown", True) outside git or before the first
    commit. Untracked files and the pipeline's own outputs (dvc.lock) do not count as dirty."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return "unknown", True
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", *PIPELINE_OUTPUTS)
    return head.stdout.strip(), bool(status.stdout.strip())


def default_uri(root: Path) -> str:
    """The project's own store: mlflow/mlflow.db (artifacts beside it in mlflow/artifacts)."""
    return f"sqlite:///{(root / 'mlflow' / 'mlflow.db').resolve()}"


def store_exists(root: Path) -> bool:
    """Whether the tracking store holds anything yet: a server is assumed to; the project's
    own sqlite store exists once a run has written it (asking a missing one creates it)."""
    return tracking_uri(root) != default_uri(root) or (root / "mlflow" / "mlflow.db").is_file()


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI if set, else the project's sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_uri(root)


def client(uri: str) -> MlflowClient:
    """A client bound to one store. Flywheel never calls mlflow.set_tracking_uri: it writes the
    URI into os.environ, so one project's store would leak into the next in a long process."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@store_call
def experiment_id(root: Path, name: str = EXPERIMENT) -> tuple[str, str]:
    """(tracking URI, experiment id) of the project's experiment, created on first use. In the
    project's own store its artifacts go to <root>/mlflow/artifacts; a tracking server keeps its
    own artifact root (a client-side path would be wrong for every other user)."""
    uri = tracking_uri(root)
    local = uri == default_uri(root)
    if local:
        (root / "mlflow").mkdir(parents=True, exist_ok=True)
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "deleted":
        raise FlywheelError(
            f"the MLflow experiment {name!r} (id {found.experiment_id}) in {display_uri(uri)} "
            "is deleted: "
            f"restore it (mlflow experiments restore --experiment-id {found.experiment_id}) "
            "or remove it for good (mlflow gc), then run again"
        )
    if found is not None:
        return uri, found.experiment_id
    artifacts = (root / "mlflow" / "artifacts").resolve().as_uri() if local else None
    return uri, mlflow_client.create_experiment(name, artifact_location=artifacts)


def flatten(mapping: dict[str, Any]) -> dict[str, str]:
    """{"train": {"lr": 5e-5}} -> {"train.lr": "5e-05"}: config sections as MLflow params
    (values as text, cut to MLflow's 6,000-character limit)."""
    return {key: str(value)[:6000] for key, value in dotted(mapping).items()}


@dataclass(frozen=True)
class RunRef:
    """An MLflow run the pipeline opened: passed to stage tasks so they nest under it."""

    run_id: str
    experiment_id: str
    uri: str  # the tracking store holding it
    lineage: Lineage


@store_call
def log_params_and_tags(
    run: RunRef, params: Mapping[str, str], tags: Mapping[str, str] | None = None
) -> None:
    """Params and tags in batches of 100."""
    from mlflow.entities import Param, RunTag

    mlflow_client = client(run.uri)
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), BATCH):
        mlflow_client.log_batch(run.run_id, params=items[start : start + BATCH])
    tag_items = [RunTag(k, v) for k, v in (tags or {}).items()]
    for start in range(0, len(tag_items), BATCH):
        mlflow_client.log_batch(run.run_id, tags=tag_items[start : start + BATCH])


@store_call
def log_metrics(run: RunRef, points: Iterable[tuple[str, float, int]]) -> int:
    """(key, value, step) points in batches of 1000; returns how many were logged."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, int(step)) for key, value, step in points]
    mlflow_client = client(run.uri)
    for start in range(0, len(metrics), 1000):
        mlflow_client.log_batch(run.run_id, metrics=metrics[start : start + 1000])
    return len(metrics)


def log_scalars(run: RunRef, values: Mapping[str, float], step: int = 0) -> None:
    """Summary numbers (one point each) in one batch."""
    log_metrics(run, [(key, value, step) for key, value in values.items()])


def set_tags(run: RunRef, tags: Mapping[str, str]) -> None:
    log_params_and_tags(run, {}, tags)


def config_params(cfg: Config) -> dict[str, str]:
    """The full resolved configuration as MLflow params (`train.lr`, `split.val`, ...)."""
    return flatten(cfg.model_dump(mode="json", by_alias=True))


@contextmanager
def start_run(
    root: Path,
    stage: str,
    lineage: Lineage,
    *,
    run_name: str | None = None,
    parent: RunRef | None = None,
    params: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[RunRef]:
    """Open a run for `stage` tagged with its lineage, nested under `parent` if given; it ends
    FINISHED, or FAILED on an error.

    Runs are addressed by id through a client rather than MLflow's thread-local "active run",
    so a stage task may run in any thread Prefect chooses.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    uri, exp = (parent.uri, parent.experiment_id) if parent else experiment_id(root)
    run_tags = {"flywheel.stage": stage, **lineage.tags(), **(tags or {})}
    if parent is not None:
        run_tags[MLFLOW_PARENT_RUN_ID] = parent.run_id
    ref = _create_run(uri, exp, run_name or stage, run_tags, lineage)
    try:
        log_params_and_tags(ref, params or {})
        yield ref
    except BaseException:
        try:
            _terminate(ref, "FAILED")
        except TrackingStoreError as exc:  # the store failing must not hide why the run failed
            log.warning("could not mark MLflow run %s FAILED: %s", ref.run_id, exc)
        raise
    _terminate(ref, "FINISHED")


@store_call
def _create_run(
    uri: str, experiment: str, name: str, tags: Mapping[str, str], lineage: Lineage
) -> RunRef:
    run = client(uri).create_run(experiment, run_name=name, tags=dict(tags))
    return RunRef(run.info.run_id, experiment, uri, lineage)


@store_call
def _terminate(run: RunRef, status: str) -> None:
    client(run.uri).set_terminated(run.run_id, status)


def stage_run(
    cfg: Config, name: str, parent: RunRef, tags: Mapping[str, str] | None = None
) -> contextlib.AbstractContextManager[RunRef]:
    """The nested run of one stage: the full config as params, the parent's lineage."""
    params = config_params(cfg)
    return start_run(cfg.root, name, parent.lineage, parent=parent, params=params, tags=tags)


@contextmanager
def pipeline_run(
    cfg: Config, lineage: Lineage, name: str, splits: Mapping[str, Path]
) -> Iterator[RunRef]:
    """The parent run of one flow run: full config, lineage tags, every split as a dataset."""
    import pandas as pd

    with start_run(cfg.root, "pipeline", lineage, run_name=name, params=config_params(cfg)) as run:
        for split, path in splits.items():
            log_dataset(run, pd.read_parquet(path), path, split)
        yield run


@store_call
def log_dataset(run: RunRef, frame: pd.DataFrame, path: Path, context: str) -> None:
    """Record a split as an MLflow dataset input: name = `<split>@<data version>`, digest = the
    file's md5 (its entry in the DVC data version's listing), source = the Parquet file."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    with warnings.catch_warnings():
        # MLflow 3 registers its local-file source twice and warns about the ambiguity.
        warnings.filterwarnings("ignore", message="The specified dataset source can be")
        dataset = mlflow.data.from_pandas(
            frame[["text", "label"]],
            source=str(path),
            name=f"{context}@{run.lineage.data_version}",
            targets="label",
            digest=file_md5(path),
        )
    entity = DatasetInput(
        dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]
    )
    client(run.uri).log_inputs(run.run_id, datasets=[entity])


@store_call
def log_artifacts(run: RunRef, local: Path, artifact_path: str | None = None) -> None:
    """A file or a folder's contents under `artifact_path` of the run."""
    mlflow_client = client(run.uri)
    if local.is_dir():
        mlflow_client.log_artifacts(run.run_id, str(local), artifact_path)
    else:
        mlflow_client.log_artifact(run.run_id, str(local), artifact_path)


def display_uri(uri: str) -> str:
    """A store URI fit to print: user and password (https://user:token@..., postgresql://...)
    replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def run_url(run: RunRef) -> str:
    """Where to look at a run: its page on a tracking server, or the store and run id."""
    uri = display_uri(run.uri)
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{run.experiment_id}/runs/{run.run_id}"
    return f"{uri} run {run.run_id}"
