"""The training slot: a global concurrency limit of one on the Prefect server."""

from __future__ import annotations

import time

import pytest
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency

from flywheel.flows.limits import TRAINING, ensure_limit, training_slot


def test_a_second_training_waits_for_the_first():
    ensure_limit(TRAINING, 1)
    with concurrency(TRAINING, occupy=1, strict=True):  # another run is training
        started = time.monotonic()
        with pytest.raises(TimeoutError), training_slot(timeout_seconds=2):
            pytest.fail("took a second training slot")
        assert time.monotonic() - started >= 2
        with training_slot(needed=False):  # a reused training takes no slot
            pass
    with training_slot(timeout_seconds=30):  # released: free again
        pass
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(TRAINING).limit == 1


def test_the_limit_is_set_back_to_one():
    ensure_limit(TRAINING, 3)
    with training_slot(timeout_seconds=30):
        pass
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(TRAINING).limit == 1
