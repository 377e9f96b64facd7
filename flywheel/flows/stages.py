"""The pipeline's stages in order, from their declarations (`STAGE` in each tasks/ module), and
how the flow runs a cached stage through Prefect (docs/decisions/0007)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from prefect.cache_policies import CachePolicy

from flywheel.cache import Plan
from flywheel.config import Config
from flywheel.errors import FlywheelError
from flywheel.stages import StageSpec
from flywheel.tasks import (
    baseline,
    collect,
    evaluate,
    export,
    prepare,
    promote,
    register,
    train,
    validate,
    version,
)

STAGES: tuple[StageSpec, ...] = (
    collect.STAGE,
    validate.STAGE,
    prepare.STAGE,
    version.STAGE,
    baseline.STAGE,
    train.STAGE,
    evaluate.STAGE,
    export.STAGE,
    register.STAGE,
    promote.STAGE,
)
BY_NAME = {s.name: s for s in STAGES}
CACHED = tuple(s for s in STAGES if s.cached)
DATA_STAGES = tuple(s for s in CACHED if s.keyed_on == "raw")  # keyed on the raw table's md5
MODEL_STAGES = tuple(s for s in CACHED if s.keyed_on == "data")  # keyed on the data version
DVC_STAGES = tuple(s for s in STAGES if s.standalone)  # dvc.yaml's, `flywheel stage NAME`

# The flow's `force_from` parameter: a cached stage (Prefect validates the value).
Stage = StrEnum("Stage", {s.name.upper(): s.name for s in CACHED})  # type: ignore[misc]


class UnknownStageError(FlywheelError):
    """A stage name that is not one of the declared stages."""


def parse_stage(
    name: str, among: Sequence[StageSpec] = CACHED, option: str = "--force-from"
) -> str:
    """`name` if it is one of `among`, else an error listing them."""
    if name in {s.name for s in among}:
        return name
    known = ", ".join(s.name for s in among)
    raise UnknownStageError(f"unknown stage {name!r} for {option} (one of {known})")


def run_standalone(name: str, cfg: Config) -> str:
    """Run a dvc.yaml stage without Prefect (`flywheel stage NAME`); returns what it did."""
    spec = BY_NAME[parse_stage(name, DVC_STAGES, "flywheel stage")]
    return getattr(importlib.import_module(spec.module), str(spec.standalone))(cfg)


def forced_from(start: str | None) -> frozenset[str]:
    """The cached stages `--force-from start` runs anew: it and every one after it."""
    if start is None:
        return frozenset()
    names = [s.name for s in CACHED]
    return frozenset(names[names.index(parse_stage(str(start))) :])


def run_stage(plan: Plan, task: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a stage's Prefect task with its cache key: Prefect returns the persisted result when
    the plan reuses it, and runs it (overwriting the record) when the plan says run."""
    step = plan.steps[task.name]
    cached = task.with_options(
        cache_policy=CachePolicy.from_cache_key_fn(lambda *_: step.key.record),
        persist_result=True,
        result_storage=plan.results_dir,
        refresh_cache=plan.runs(task.name),
    )
    state = cached(*args, return_state=True, **kwargs)
    result = state.result()
    plan.executed(task.name, result, reused=state.name == "Cached")
    return result
