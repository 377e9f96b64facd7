"""Prefect global concurrency limits of the pipeline: training runs one at a time.

Scheduled runs, a feedback-triggered run and a hand-started one may overlap; their data and
report stages can, but two trainings on one machine would each take twice as long and fight
for memory. The limit lives on the Prefect server, so it holds across processes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

TRAINING = "flywheel-training"


def ensure_limit(name: str, limit: int) -> None:
    """Create the global concurrency limit `name` with `limit` slots, or set it to `limit`."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit)


@contextmanager
def training_slot(needed: bool = True, timeout_seconds: float | None = None) -> Iterator[None]:
    """Hold the one training slot while the block runs (waiting for another run's training to
    finish); `needed=False` (training is reused from the cache) takes no slot."""
    if not needed:
        yield
        return
    from prefect.concurrency.sync import concurrency

    ensure_limit(TRAINING, 1)
    log.info("train: waiting for the training slot (%s, limit 1)", TRAINING)
    with concurrency(TRAINING, occupy=1, timeout_seconds=timeout_seconds, strict=True):
        yield
