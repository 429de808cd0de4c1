"""The fine-tune progress bar: loss terms, LR and images/s on one line (rich, rank 0, terminals only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_NOT_TERMS = {"kind", "step", "epoch", "lr", "images_per_s", "grad_norm", "skipped"}


class Progress:
    """A rich progress bar; silent off a terminal or when disabled. Speed is smoothed (EMA) for display."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        self.speed: float | None = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        console = Console(stderr=True)
        if not console.is_terminal:
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
        if self.bar is None:
            return
        terms = " ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in _NOT_TERMS and isinstance(v, float))
        info = f"{terms} lr={row['lr']:.2e} {self.speed:.1f} img/s"
        self.bar.update(self.task, completed=row["step"], info=info)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
