"""Progress for long extractions: a bar on an interactive terminal; elsewhere (logs, CI, a pipe)
plain log lines every few seconds (:class:`efquant_fx.logs.ProgressLog`), shown by the CLI."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from efquant_fx.logs import ProgressLog


@contextmanager
def progress_bar(
    total: int, description: str, enabled: bool | None = None
) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; a bar when stderr is a terminal (unless ``enabled`` is False). Without
    a bar, the count goes to log lines instead (a bar drawn into a log file shows nothing)."""
    console = Console(stderr=True)
    if total <= 0:
        yield lambda n: None
        return
    if enabled is False or not console.is_terminal:
        lines = ProgressLog(description, total, "image")
        yield lambda n: lines.advance(n)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
