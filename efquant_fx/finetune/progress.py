"""The fine-tune progress: loss terms, LR and images/s on one line (rank 0 only).

On a terminal, a rich bar; anywhere else (a pipe, a log file, a cluster job) a plain log line every
few seconds through :class:`efquant_fx.logs.ProgressLog`, so a logged fine-tune is never silent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from efquant_fx.logs import ProgressLog

_NOT_TERMS = {"kind", "step", "epoch", "lr", "images_per_s", "grad_norm", "skipped"}


class Progress:
    """A rich progress bar on a terminal, log lines elsewhere; nothing when disabled (other ranks).
    Speed is smoothed (EMA) for display."""

    def __init__(self, total: int, start: int, enabled: bool, *, terminal: bool | None = None):
        self.bar = None
        self.lines: ProgressLog | None = None
        self.speed: float | None = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        console = Console(stderr=True)
        if not (console.is_terminal if terminal is None else terminal):
            self.lines = ProgressLog("fine-tune", total, "step", start=start)
            return
        self.bar = RichProgress(TextColumn("fine-tune"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), console=console, transient=False)
        self.task = self.bar.add_task("fine-tune", total=total, completed=start, info="")

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def update(self, row: Mapping[str, Any]) -> None:
        """Show a ``kind: train`` history row."""
        speed = row["images_per_s"]
        self.speed = speed if self.speed is None else 0.9 * self.speed + 0.1 * speed
        if self.bar is None and self.lines is None:
            return
        terms = " ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in _NOT_TERMS and isinstance(v, float))
        info = f"{terms} lr={row['lr']:.2e} {self.speed:.1f} img/s"
        if self.lines is not None:
            self.lines.update(row["step"], info)
        else:
            self.bar.update(self.task, completed=row["step"], info=info)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
