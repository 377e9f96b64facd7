"""flywheel.progress: a bar on a terminal, a log line every N steps elsewhere, a summary line at
the end either way."""

from __future__ import annotations

import io
import logging
import re

import pytest
from rich.console import Console

from flywheel import progress as progress_module
from flywheel.progress import on_terminal, progress

LOGGER = "flywheel.tests.progress"


@pytest.fixture
def clock(monkeypatch):
    """A clock the test moves: `clock.tick(s)`."""

    class Clock:
        now = 1000.0

        def __call__(self) -> float:
            return self.now

        def tick(self, seconds: float) -> None:
            self.now += seconds

    fake = Clock()
    monkeypatch.setattr(progress_module, "clock", fake)
    monkeypatch.setattr(progress_module, "on_terminal", lambda stream=None: False)
    return fake


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_off_a_terminal_a_line_every_n_steps_with_rate_and_eta_and_a_summary(clock, caplog):
    with (
        caplog.at_level(logging.INFO, logger=LOGGER),
        progress(
            "int8 probes", 25, unit="probe", every=10, logger=logging.getLogger(LOGGER)
        ) as bar,
    ):
        for i in range(25):
            clock.tick(2.0)
            bar.advance(agreement=0.99 - i / 1000, group=f"g{i}")
    assert lines(caplog) == [
        "int8 probes: 10/25 probes (40%), 2.00 s/probe, ETA 0:00:30, agreement 0.9810, group g9",
        "int8 probes: 20/25 probes (80%), 2.00 s/probe, ETA 0:00:10, agreement 0.9710, group g19",
        "int8 probes: 25 probes in 0:00:50 (2.00 s/probe), agreement 0.9660, group g24",
    ]


def test_rate_and_eta_count_this_session_only(clock, caplog):
    """A resumed run starts at its step: the steps before are not work done now."""
    with (
        caplog.at_level(logging.INFO, logger=LOGGER),
        progress("train", 200, completed=100, every=50, logger=logging.getLogger(LOGGER)) as bar,
    ):
        for _ in range(50):
            clock.tick(0.25)
            bar.advance(loss=0.4123, **{"samples/s": 128.0})
        assert bar.rate == pytest.approx(4.0)
        assert bar.eta == pytest.approx(12.5)
        clock.tick(1.0)
    assert lines(caplog) == [
        "train: 150/200 steps (75%), 4.00 step/s, ETA 0:00:12, loss 0.4123, samples/s 128.0",
        "train: 150/200 steps in 0:00:14 (3.70 step/s), loss 0.4123, samples/s 128.0",
    ]


def test_a_loop_that_raises_logs_no_summary(clock, caplog):
    with (
        caplog.at_level(logging.INFO, logger=LOGGER),
        pytest.raises(RuntimeError),
        progress("export", 3, every=10, logger=logging.getLogger(LOGGER)) as bar,
    ):
        bar.advance()
        raise RuntimeError("boom")
    assert lines(caplog) == []


def test_on_a_terminal_a_bar_with_count_rate_eta_and_fields_nested_bars_share_it(clock, caplog):
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=160, color_system=None)
    logger = logging.getLogger(LOGGER)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        with progress("train", 50, unit="step", console=console, logger=logger) as bar:
            for _ in range(5):
                clock.tick(2.0)
                bar.advance(loss=0.5, **{"samples/s": 16.0})
            # a second loop meanwhile: one more line in the same display (drawing it redraws all)
            with progress("evaluate model", 1242, unit="text", logger=logger) as inner:
                clock.tick(1.0)
                inner.advance(64)
        drawn = screen.getvalue()
    assert re.search(
        r"train +━+[ ╸━]* +5/50 +steps +10% .*2\.00 s/step +ETA 0:01:30 +loss 0\.5000, "
        r"samples/s 16\.0",
        drawn,
    ), drawn
    assert re.search(r"evaluate model .* 0/1242 +texts", drawn), drawn
    assert "\x1b[?25l" in drawn  # drawn as a live display (cursor hidden while it runs)
    # no periodic log lines on a terminal; the summaries still go to the log
    assert lines(caplog) == [
        "evaluate model: 64/1,242 texts in 0:00:01 (64.00 text/s)",
        "train: 5/50 steps in 0:00:11 (2.20 s/step), loss 0.5000, samples/s 16.0",
    ]
    assert progress_module._display is None  # the display is gone with the last loop


def test_a_terminal_is_a_tty_outside_ci(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("TERM", raising=False)
    assert on_terminal(Tty())
    assert not on_terminal(io.StringIO())
    monkeypatch.setenv("CI", "true")
    assert not on_terminal(Tty())
