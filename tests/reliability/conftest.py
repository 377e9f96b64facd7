"""The reliability and security suite (issue 18): `make reliability` runs it alone (`-m
reliability`, with pip-audit); CI runs it with everything else."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from flywheel import servers
from flywheel.registry import ModelRegistry

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test in this folder `reliability`."""
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.reliability)


@contextlib.contextmanager
def serving(
    project: tuple[Path, ModelRegistry], reload_seconds: float, env: dict[str, str] | None = None
) -> Iterator[servers.Server]:
    """The real `flywheel serve` over the project's registry on a free loopback port (log in
    serve.log), stopped by its own id at the end, whatever happens."""
    root, registry = project
    spec = servers.serve_spec(
        root / "params.yaml",
        servers.free_port(),
        reload_seconds,
        root / "serve.log",
        {"MLFLOW_TRACKING_URI": registry.uri, **(env or {})},
    )
    with servers.running([spec]) as running:
        yield running[0]
