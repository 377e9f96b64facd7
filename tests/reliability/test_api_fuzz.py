"""The real `flywheel serve` under property-based requests generated from its own OpenAPI
schema (schemathesis), valid and invalid: no 5xx, every refusal a 4xx with a message. Bounded:
MAX_EXAMPLES per operation and mode, on loopback, the server stopped by its own id."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from tests.reliability.conftest import serving
from tests.serving.conftest import exports, project  # noqa: F401 (fixtures)

TOKEN = "fuzz-token"
MAX_EXAMPLES = 40  # per operation


@pytest.fixture
def served(project):  # noqa: F811
    with serving(project, 0, {"FLYWHEEL_API_TOKEN": TOKEN}) as server:
        yield server.spec.url


@pytest.mark.slow
def test_generated_requests_get_no_5xx_and_refusals_say_why(served):
    import schemathesis

    # schemathesis' default generation: requests that fit the schema and requests that do not
    schema = schemathesis.openapi.from_url(f"{served}/openapi.json")
    sent, statuses = 0, {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case):
            nonlocal sent
            response = case.call(
                base_url=served, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
            )
            sent += 1
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (case.method, case.path, response.text[:500])
            if response.status_code >= 400:
                assert response.json().get("detail"), response.text[:500]

        check()
    # the run really exercised the API, with accepted and refused requests
    assert sent >= 50 and any(s < 300 for s in statuses) and any(s >= 400 for s in statuses)
    print(f"schemathesis: {sent} requests, statuses {dict(sorted(statuses.items()))}")
