"""Progress a person can see, for any loop that can take more than a few seconds.

    with progress("train", total=321, unit="step") as bar:
        for ...:
            bar.advance(loss=0.41, **{"samples/s": 45.9})

On a terminal (stderr is a TTY and `CI` is not set) it draws a rich bar: count, percentage,
elapsed time, rate, ETA and the fields. Anywhere else (CI, a log file, a Prefect worker) it logs
one line every `every` steps instead, with the same figures. Either way a last line is logged
when the loop ends (not when it raises), so the log file holds how long each loop took. Bars
drawn while another is live share its display (one line each), so nesting is safe; log lines
printed meanwhile appear above the bars.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as RichProgress

log = logging.getLogger(__name__)

Field = float | int | str
clock = time.perf_counter  # seconds; tests set their own
LINES_BY_DEFAULT = 10  # log lines per loop when `every` is not given


def on_terminal(stream: TextIO | None = None) -> bool:
    """Whether to draw bars: `stream` (default stderr) is a terminal and this is not CI."""
    if (
        os.environ.get("CI", "").lower() not in ("", "0", "false")
        or os.environ.get("TERM") == "dumb"
    ):
        return False
    isatty = getattr(stream or sys.stderr, "isatty", None)
    return bool(isatty is not None and isatty())


def duration(seconds: float) -> str:
    """H:MM:SS."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def rate_text(rate: float, unit: str) -> str:
    """`12.5 text/s`, or `1.39 s/step` below one per second."""
    if rate <= 0:
        return f"- {unit}/s"
    return f"{rate:,.2f} {unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{unit}"


def field_text(value: Field) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def plural(unit: str) -> str:
    return unit if unit.endswith("s") else unit + "s"


class Progress:
    """One loop's progress: call `advance` after each step (or `n` of them) with the figures to
    show, e.g. `advance(loss=0.41)`. Rate and ETA count this session only (`completed` at the
    start, e.g. a resumed run's step, is not work done now)."""

    def __init__(
        self,
        description: str,
        total: int | None,
        unit: str = "step",
        completed: int = 0,
        every: int | None = None,
        logger: logging.Logger | None = None,
    ):
        self.description, self.total, self.unit = description, total, unit
        self.completed = self.initial = completed
        if every is None:
            every = max(1, math.ceil(total / LINES_BY_DEFAULT)) if total else 0
        self.every = every
        self.logger = logger or log
        self.fields: dict[str, Field] = {}
        self.started = clock()
        self._bar: tuple[RichProgress, TaskID] | None = None

    # -- figures ---------------------------------------------------------------------------------

    @property
    def elapsed(self) -> float:
        return clock() - self.started

    @property
    def rate(self) -> float:
        """Steps per second in this session."""
        elapsed = self.elapsed
        return (self.completed - self.initial) / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate; None without a total or a rate."""
        rate = self.rate
        if self.total is None or rate <= 0:
            return None
        return max(self.total - self.completed, 0) / rate

    def fields_text(self) -> str:
        return ", ".join(f"{name} {field_text(value)}" for name, value in self.fields.items())

    def line(self) -> str:
        """`train: 40/321 steps (12%), 0.72 step/s, ETA 0:06:30, loss 0.4123`."""
        count = f"{self.completed:,}"
        if self.total is not None:
            count += f"/{self.total:,} {plural(self.unit)}"
            if self.total:
                count += f" ({100 * self.completed / self.total:.0f}%)"
        else:
            count += f" {plural(self.unit)}"
        parts = [count, rate_text(self.rate, self.unit)]
        if (eta := self.eta) is not None:
            parts.append(f"ETA {duration(eta)}")
        if self.fields:
            parts.append(self.fields_text())
        return f"{self.description}: " + ", ".join(parts)

    def summary(self) -> str:
        """`train: 321/321 steps in 0:07:25 (0.72 step/s), loss 0.3012`."""
        count = f"{self.completed:,}"
        if self.total is not None and self.completed != self.total:
            count += f"/{self.total:,}"
        text = (
            f"{self.description}: {count} {plural(self.unit)} in {duration(self.elapsed)} "
            f"({rate_text(self.rate, self.unit)})"
        )
        return text + (f", {self.fields_text()}" if self.fields else "")

    # -- steps -----------------------------------------------------------------------------------

    def advance(self, n: int = 1, **fields: Field) -> None:
        """`n` more steps done; `fields` (loss=..., candidate=...) replace the shown values."""
        before = self.completed
        self.completed += n
        self.fields.update(fields)
        if self._bar is not None:
            bar, task = self._bar
            bar.update(task, advance=n, **self._columns())
        elif (
            self.every
            and self.completed // self.every > before // self.every
            and (self.total is None or self.completed < self.total)  # the summary says the last
        ):
            self.logger.info("%s", self.line())

    def _columns(self) -> dict[str, str]:
        eta = self.eta
        return {
            "unit": plural(self.unit),
            "rate": rate_text(self.rate, self.unit) if self.completed > self.initial else "",
            "eta": f"ETA {duration(eta)}" if eta is not None else "",
            "info": self.fields_text(),
        }


# --- the bar: one rich display, shared by the loops running at the same time --------------------

_lock = threading.Lock()
_display: RichProgress | None = None
_users = 0


def _new_display(console: Console, redirect: bool) -> RichProgress:
    return RichProgress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[eta]}"),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=True,  # the summary line replaces it
        refresh_per_second=4,
        redirect_stdout=redirect,
        redirect_stderr=redirect,
    )


@contextmanager
def _shared_display(console: Console | None) -> Iterator[RichProgress]:
    global _display, _users
    with _lock:
        if _display is None:
            redirect = console is None  # prints and log lines go above the bar
            _display = _new_display(console or Console(stderr=True), redirect)
            _display.start()
        _users += 1
        display = _display
    try:
        yield display
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                display.stop()
                _display = None


@contextmanager
def progress(
    description: str,
    total: int | None,
    *,
    unit: str = "step",
    completed: int = 0,
    every: int | None = None,
    logger: logging.Logger | None = None,
    console: Console | None = None,
) -> Iterator[Progress]:
    """Show a loop's progress: a bar on a terminal (or on `console`, if given; inside another
    loop's bar, a line of its display), else a log line on `logger` every `every` steps
    (default: about 10 lines per loop); a summary line at the end either way. `completed`:
    steps already done before (a resumed run)."""
    tracker = Progress(description, total, unit, completed, every, logger)
    if console is None and _display is None and not on_terminal():
        yield tracker
    else:
        with _shared_display(console) as display:
            task = display.add_task(
                description, total=total, completed=completed, **tracker._columns()
            )
            tracker._bar = (display, task)
            try:
                yield tracker
            finally:
                tracker._bar = None
                display.remove_task(task)
    tracker.logger.info("%s", tracker.summary())
