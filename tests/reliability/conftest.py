"""The reliability and security suite (issue 18): `make reliability` runs it alone (`-m
reliability`, with pip-audit); CI runs it with everything else."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test in this folder `reliability`."""
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.reliability)
