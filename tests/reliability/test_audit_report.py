"""The verdict on pip-audit's report: clean only when every package was audited and none is
vulnerable; a report whose packages were all skipped (the service unreachable) is a failure."""

from __future__ import annotations

import json

from tests.reliability.audit_report import main, verdict

AUDITED = {"name": "httpx", "version": "0.28.1", "vulns": []}
EDITABLE = {"name": "flywheel", "skip_reason": "distribution marked as editable"}


def skipped(name: str) -> dict:
    return {
        "name": name,
        "skip_reason": f"Dependency not found on PyPI and could not be audited: {name} (1.0)",
    }


def test_every_package_audited_and_none_vulnerable_is_clean(tmp_path, capsys):
    report = {"dependencies": [AUDITED, EDITABLE]}
    assert verdict(report).ok
    path = tmp_path / "audit.json"
    path.write_text(json.dumps(report))
    assert main([str(path)]) == 0
    assert "1 packages audited, 0 could not be, 0 known vulnerabilities" in capsys.readouterr().out


def test_a_known_vulnerability_fails_and_is_named(tmp_path, capsys):
    bad = {"name": "jinja2", "version": "3.1.2", "vulns": [{"id": "GHSA-h5c8-rqwp-cp95"}]}
    path = tmp_path / "audit.json"
    path.write_text(json.dumps({"dependencies": [AUDITED, bad]}))
    assert main([str(path)]) == 1
    assert "jinja2==3.1.2: GHSA-h5c8-rqwp-cp95" in capsys.readouterr().out


def test_packages_that_could_not_be_audited_are_no_clean_bill(tmp_path, capsys):
    report = {"dependencies": [skipped("aiohttp"), skipped("torch"), EDITABLE]}
    result = verdict(report)
    assert not result.ok and result.audited == 0 and set(result.skipped) == {"aiohttp", "torch"}
    path = tmp_path / "audit.json"
    path.write_text(json.dumps(report))
    assert main([str(path)]) == 1
    out = capsys.readouterr().out
    assert "0 packages audited, 2 could not be" in out
    assert "2 x Dependency not found on PyPI and could not be audited" in out
