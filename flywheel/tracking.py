"""MLflow tracking, at the edge: every MLflow call of the pipeline goes through this module.

Default store: `sqlite:///<root>/mlflow/mlflow.db` with artifacts in `<root>/mlflow/artifacts`;
MLFLOW_TRACKING_URI overrides it (e.g. a team server). Params, metrics and tags are sent with
`log_batch` (a few calls per run, not one HTTP call per number).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXPERIMENT = "flywheel"
BATCH = 100  # MLflow accepts at most 100 params/tags and 1000 metrics per log_batch


@dataclass(frozen=True)
class Lineage:
    """What a run was made from: data, code and orchestration."""

    data_version: str
    git_commit: str
    git_dirty: bool
    flow_run_id: str | None

    def tags(self) -> dict[str, str]:
        return {
            "flywheel.data_version": self.data_version,
            "mlflow.source.git.commit": self.git_commit,
            "flywheel.git_dirty": str(self.git_dirty).lower(),
            "flywheel.flow_run_id": self.flow_run_id or "none",
        }


def git_state(root: Path) -> tuple[str, bool]:
    """(commit, dirty) of the project; ("unknown", True) outside git."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return "unknown", True
    dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    return head.stdout.strip(), dirty


def tracking_uri(root: Path) -> str:
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{(root / 'mlflow' / 'mlflow.db').resolve()}"
    )


def experiment_id(root: Path, name: str = EXPERIMENT) -> str:
    """Point MLflow at the project's store and return the experiment's id (creating it)."""
    import mlflow

    uri = tracking_uri(root)
    if uri.startswith("sqlite:///"):
        (root / "mlflow").mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    artifacts = (root / "mlflow" / "artifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 5e-5}} -> {"train.lr": "5e-05"}: config sections as MLflow params."""
    out: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


def log_params_and_tags(run_id: str, params: Mapping[str, str], tags: Mapping[str, str]) -> None:
    """Params and tags in batches of 100."""
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    client = MlflowClient()
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), BATCH):
        client.log_batch(run_id, params=items[start : start + BATCH])
    tag_items = [RunTag(k, v) for k, v in tags.items()]
    for start in range(0, len(tag_items), BATCH):
        client.log_batch(run_id, tags=tag_items[start : start + BATCH])


def log_metrics(run_id: str, points: Iterable[tuple[str, float, int]]) -> int:
    """(key, value, step) points in batches of 1000; returns how many were logged."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, int(step)) for key, value, step in points]
    client = MlflowClient()
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    return len(metrics)
