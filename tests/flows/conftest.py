"""Flow tests: one Prefect test server for all, and a small committed project to run on."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flywheel.config import EmbeddedSource
from flywheel.sources import read_embedded
from tests.conftest import make_project, run

ROWS_PER_LABEL = 300
TRAIN = {"max_length": 32, "batch_size": 16, "checkpoint_every_steps": 5, "log_every_steps": 2}
# No sensitivity search on the slice (the gate and search are tested in tests/model); bounds any
# int8 model passes, so the run exercises the int8 path end to end.
EXPORT = {
    "max_fp32_groups": 0,
    "min_agreement": 0.01,
    "max_metric_loss": 0.99,
    "latency_texts": 10,
    "min_int8_speedup": 0.0,  # ~60 validation texts time too noisily to decide on speed
}
# A 600-row, one-epoch model: the absolute gates are tested in tests/model/test_registry.py.
REGISTRY = {"min_test_macro_f1": 0.0, "max_p95_latency_ms": 1000.0}


def small_project(
    root: Path,
    remote: Path,
    rows_per_label: int = ROWS_PER_LABEL,
    sample_seed: int = 0,
    **sections: dict[str, Any],
) -> Path:
    """A committed project whose only source is a balanced slice of the default data
    (`rows_per_label` per label), with the small-run settings TRAIN, EXPORT and REGISTRY;
    `sections` replace those (registry={} keeps params.yaml's gates) or set others (split)."""
    make_project(root, remote)
    frame = read_embedded(EmbeddedSource(kind="embedded"))
    frame = frame.groupby("label").sample(rows_per_label, random_state=sample_seed)
    frame[["text", "label"]].to_csv(root / "data" / "sources" / "slice.csv", index=False)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["sources"] = [{"kind": "path", "path": "data/sources/slice.csv"}]
    small = {"train": TRAIN, "export": EXPORT, "registry": REGISTRY}
    for name, values in (small | sections).items():
        params[name].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "p"], root)
    return root


@pytest.fixture(scope="session", autouse=True)
def prefect_harness(prefect_server):
    """Every flow test runs against the session's temporary Prefect server (tests/conftest.py)."""


@pytest.fixture(scope="module", autouse=True)
def project_store():
    """Every run goes to its project's own sqlite store (mlflow/ in the project), whatever
    MLFLOW_TRACKING_URI the environment has."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


def flow_run_artifacts(flow_run_id: str | UUID) -> dict[str, Any]:
    """The artifacts a flow run published, by key."""
    with get_client(sync_client=True) as prefect:
        found = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(str(flow_run_id))])
            )
        )
    return {a.key: a for a in found}


def prefect_records() -> list[str]:
    """Every log message and artifact this test session's Prefect server holds, as text (for
    scans: personal data or secrets must not be in them)."""
    texts: list[str] = []
    with get_client(sync_client=True) as prefect:
        while page := prefect.read_logs(limit=200, offset=len(texts)):
            texts += [log.message for log in page]
        artifacts = prefect.read_artifacts()
    return texts + [f"{a.key} {a.description} {a.data}" for a in artifacts]


@contextmanager
def flywheel_logs_to_prefect() -> Iterator[None]:
    """Flywheel's own log lines (INFO and up) go to the Prefect server too, as they do for
    `flywheel run` (PREFECT_LOGGING_EXTRA_LOGGERS=flywheel, which Prefect reads only at start)."""
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW, temporary_settings

    logger, handler = logging.getLogger("flywheel"), APILogHandler()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with temporary_settings({PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}):
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
