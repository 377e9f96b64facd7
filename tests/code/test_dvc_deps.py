"""dvc.yaml's code dependencies are the import closures the stage cache hashes (flywheel/cache.py),
so `dvc repro` and `flywheel run` see the same code change, and neither drifts from the code."""

from __future__ import annotations

from collections.abc import Mapping

import yaml

from flywheel import cache
from tests.conftest import REPO


def stage_modules(name: str) -> tuple[str, ...]:
    """The task modules a dvc.yaml stage runs: the stage cache's own (cache.CODE); collect, which
    the cache never reuses (it always runs), is its module named after it."""
    if name in set(cache.Stage):
        return cache.CODE[cache.Stage(name)]
    return (f"flywheel/tasks/{name}.py",)


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


def test_every_stage_depends_on_exactly_the_code_it_imports():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert set(stages) == {"collect", "validate", "prepare"}
    declared = {name: code_deps(stage) for name, stage in stages.items()}
    closures = {name: set(cache.code_hashes(*stage_modules(name))) for name in stages}
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
