"""Progress as plain log lines, for runs whose output is not a terminal (a pipe, a log file, CI).

A rich progress bar draws on a terminal and prints nothing anywhere else, so a piped or logged run
of a long job (synthesis, calibration, learned rounding, fine-tuning, evaluation) was silent for
minutes. Where a long loop draws no bar it reports to a :class:`ProgressLog` instead, which writes
an INFO line to the ``efquant_fx`` logger every few seconds: stage, count, rate and ETA. The command
line shows these lines on stderr when stderr is not a terminal (:func:`log_to_stderr`); a Python
caller sees them once it configures logging (``logging.basicConfig(level=logging.INFO)``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

log = logging.getLogger("efquant_fx.progress")

EVERY_S = 5.0  # at most one line per stage this often (and always the first and the last)


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ProgressLog:
    """Throttled progress lines for one stage: ``fine-tune: step 40/200 (20%), 1.3 step/s, ETA 2m03s; loss=0.12``.

    ``start`` is where a resumed loop begins (the rate counts only this run's work); ``clock`` is
    replaceable so tests need not sleep.
    """

    def __init__(self, stage: str, total: int | None, unit: str = "step", *, start: int = 0,
                 every_s: float = EVERY_S, logger: logging.Logger | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stage, self.total, self.unit, self.every_s = stage, total, unit, every_s
        self.log = logger or log
        self.clock = clock
        self.start = self.done = start
        self.t0 = self.last = clock()
        self.log.info("%s: %s", stage, f"{total} {unit}s" if total is not None else "started")

    def advance(self, n: int = 1, info: str = "") -> None:
        self.update(self.done + n, info)

    def update(self, done: int, info: str = "") -> None:
        """The count so far; a line when ``every_s`` passed since the last one, or at the end."""
        self.done = done
        now = self.clock()
        if done == self.total or now - self.last >= self.every_s:
            self._line(now, info)

    def _line(self, now: float, info: str) -> None:
        self.last = now
        elapsed = now - self.t0
        rate = (self.done - self.start) / elapsed if elapsed > 0 else None
        parts = [f"{self.unit} {self.done}" + (f"/{self.total} ({100 * self.done / self.total:.0f}%)"
                                               if self.total else "")]
        if rate:
            parts.append(f"{rate:.3g} {self.unit}/s")
            if self.total and self.done < self.total:
                parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        if self.total is not None and self.done >= self.total:
            parts.append(f"done in {_duration(elapsed)}")
        self.log.info("%s: %s%s", self.stage, ", ".join(parts), f"; {info}" if info else "")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test runner or a redirect may swap it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Short(logging.Formatter):
    """``12:03:04 message``; warnings and errors say so, as the CLI's own ``error:`` lines do."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"{self.formatTime(record, '%H:%M:%S')} {level}{text}"


def log_to_stderr(show_info: bool | None = None) -> Callable[[], None]:
    """Show the ``efquant_fx`` log on stderr: progress (INFO) lines when stderr is not a terminal
    (``show_info=None``; a terminal has the progress bars), warnings always. Returns a function
    that undoes it (the CLI's commands run in-process in tests, one after another)."""
    logger = logging.getLogger("efquant_fx")
    show_info = (not sys.stderr.isatty()) if show_info is None else show_info
    handler = _StderrHandler()
    handler.setFormatter(_Short("%(message)s"))
    handler.setLevel(logging.INFO if show_info else logging.WARNING)
    old_level = logger.level
    if show_info and logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)

    def undo() -> None:
        logger.removeHandler(handler)
        logger.setLevel(old_level)

    return undo
