"""`flywheel serve` beyond loopback: a token, or an explicit --insecure (issue 18, point 5)."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.serving.app import ExposedWithoutTokenError, check_exposure, is_loopback
from tests.conftest import REPO


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.53", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("example.internal", False),
    ],
)
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_beyond_loopback_needs_a_token_or_insecure():
    with pytest.raises(ExposedWithoutTokenError) as refused:
        check_exposure("0.0.0.0", None, "FLYWHEEL_API_TOKEN", insecure=False)
    assert "FLYWHEEL_API_TOKEN" in str(refused.value) and "--insecure" in str(refused.value)
    assert check_exposure("0.0.0.0", "s3cret-token", "FLYWHEEL_API_TOKEN", False) is None
    warning = check_exposure("0.0.0.0", None, "FLYWHEEL_API_TOKEN", insecure=True)
    assert warning is not None and "open to anyone" in warning
    assert check_exposure("127.0.0.1", None, "FLYWHEEL_API_TOKEN", insecure=False) is None


def test_serve_refuses_before_loading_anything(tmp_path):
    """In a project with no champion: without --insecure the exposure check stops the command
    (exit 2, nothing loaded); with it, the command goes on to look for the champion."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    env = {"FLYWHEEL_API_TOKEN": ""}
    command = ["serve", "--params", str(tmp_path / "params.yaml"), "--host", "0.0.0.0"]
    refused = CliRunner().invoke(app, command, env=env)
    assert refused.exit_code == 2, refused.output
    assert "reachable from other machines" in refused.output
    allowed = CliRunner().invoke(app, [*command, "--insecure", "--port", "0"], env=env)
    assert allowed.exit_code != 0  # no champion in this project: stops after the check
    assert "reachable from other machines" not in allowed.output
    assert "champion" in allowed.output.lower(), allowed.output
