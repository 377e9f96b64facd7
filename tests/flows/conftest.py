from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session", autouse=True)
def prefect_harness():
    """One temporary Prefect server and database for all flow tests."""
    with prefect_test_harness(server_startup_timeout=120):
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
