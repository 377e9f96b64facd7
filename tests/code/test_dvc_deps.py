"""dvc.yaml follows the stage declarations (`STAGE` in each tasks/ module): the same stages, each
running `flywheel stage NAME`, its code deps the import closure the stage cache hashes and its
params the config it reads, so `dvc repro` and `flywheel run` see the same changes."""

from __future__ import annotations

from collections.abc import Mapping

import yaml

from flywheel import cache
from flywheel.flows.stages import DVC_STAGES
from tests.conftest import REPO


def code_deps(stage: Mapping) -> set[str]:
    """The deps of a dvc.yaml stage that are flywheel source files."""
    return {d for d in stage.get("deps", []) if d.startswith("flywheel/") and d.endswith(".py")}


def drift(declared: Mapping[str, set[str]], closures: Mapping[str, set[str]]) -> list[str]:
    """Per stage, what dvc.yaml lists that differs from the import closure, in words."""
    out = []
    for stage, closure in closures.items():
        missing = sorted(closure - declared[stage])
        extra = sorted(declared[stage] - closure)
        if missing:
            out.append(f"{stage}: imported but not in dvc.yaml deps: {', '.join(missing)}")
        if extra:
            out.append(f"{stage}: in dvc.yaml deps but not imported: {', '.join(extra)}")
    return out


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def unread(reads: tuple[str, ...], stage: Mapping) -> list[str]:
    """The config keys a stage reads that dvc.yaml neither lists as params (the key or a section
    holding it) nor uses in a dependency path (`${key}`)."""
    params = stage.get("params", [])
    deps = " ".join(stage.get("deps", []))
    listed = [k for k in reads if any(k == p or k.startswith(p + ".") for p in params)]
    return [k for k in reads if k not in listed and "${" + k not in deps]


def test_dvc_yaml_has_the_declared_stages_and_commands():
    stages = dvc_stages()
    assert list(stages) == [s.name for s in DVC_STAGES]
    for spec in DVC_STAGES:
        assert stages[spec.name]["cmd"] == f".venv/bin/flywheel stage {spec.name}"


def test_every_stage_lists_the_config_it_reads():
    stages = dvc_stages()
    problems = {s.name: unread(s.reads, stages[s.name]) for s in DVC_STAGES}
    assert not any(problems.values()), f"dvc.yaml params miss what stages read: {problems}"


def test_a_config_key_read_but_not_in_params_is_named():
    stage = {"params": ["split"], "deps": ["${validate.report_dir}/checks.json"]}
    assert unread(("split.seed", "validate.report_dir", "clean"), stage) == ["clean"]
    assert unread(("splitter",), stage) == ["splitter"]
    assert unread(("split", "validate.report_dir"), stage) == []


def test_every_stage_depends_on_exactly_the_code_it_imports():
    stages = dvc_stages()
    declared = {name: code_deps(stage) for name, stage in stages.items()}
    closures = {s.name: set(cache.code_hashes(*s.code)) for s in DVC_STAGES}
    assert all(closures.values()) and all(
        p.startswith("flywheel/") for c in closures.values() for p in c
    )
    problems = drift(declared, closures)
    assert not problems, "dvc.yaml drifted from the code (fix its deps):\n" + "\n".join(problems)


def test_a_module_added_to_a_stage_but_not_to_dvc_yaml_is_named():
    declared = {"validate": {"flywheel/tasks/validate.py", "flywheel/io.py", "flywheel/old.py"}}
    closure = {"flywheel/tasks/validate.py", "flywheel/io.py", "flywheel/text.py"}
    assert drift(declared, {"validate": closure}) == [
        "validate: imported but not in dvc.yaml deps: flywheel/text.py",
        "validate: in dvc.yaml deps but not imported: flywheel/old.py",
    ]
    assert drift(declared | {"validate": closure}, {"validate": closure}) == []
