"""The shape of a pipeline stage's declaration (each stage declares itself in its tasks/ module;
flows/stages.py lists them in order)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StageSpec:
    """A pipeline stage, declared once beside its code (`STAGE = StageSpec(...)` in its tasks/
    module): the cache, the dry-run plan, the CLI's stage list and dvc.yaml follow from it."""

    name: str
    module: str  # the stage's module (`__name__`): the code its key hashes, with what it imports
    reads: tuple[str, ...] = ()  # config keys (dotted prefixes) it reads, directly or not
    upstream: tuple[str, ...] = ()  # stages whose results it consumes: when one runs, it runs
    artifacts: tuple[str, ...] = ()  # attributes of its result naming files later stages read
    facts: str | None = None  # a method of its result: the registry state the result relies on
    ships: tuple[str, ...] = ()  # more modules its output carries by path (hashed too)
    keyed_on: str | None = "data"  # "raw": the raw table's md5; "data": the data version;
    # None: not cached (it always runs)
    standalone: str | None = None  # a function (cfg) -> one line: runs it without Prefect;
    # such a stage is a dvc.yaml stage, whose cmd is `flywheel stage NAME`

    @property
    def cached(self) -> bool:
        return self.keyed_on is not None

    @property
    def code(self) -> tuple[str, ...]:
        """Its source files, relative to the repository (what `code_hashes` starts from)."""
        return tuple(m.replace(".", "/") + ".py" for m in (self.module, *self.ships))

    def files(self, result: Any) -> list[Path]:
        """The files a later stage reads from this stage's result: unchanged, or no reuse."""
        paths = []
        for name in self.artifacts:
            value = result
            for part in name.split("."):
                value = getattr(value, part)
            paths.append(Path(value))
        return paths

    def found(self, result: Any) -> dict[str, str]:
        """The registry state its result relies on (checked before reuse), if any."""
        return getattr(result, self.facts)() if self.facts else {}
