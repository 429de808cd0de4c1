"""ROC plots: teacher and compressed models on one log-FAR axis, written atomically as PNG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from efquant_fx.eval.result import Curve, EvalResult
from efquant_fx.files import atomic_path


def plot_roc(
    path: str | Path,
    curves: Mapping[str, Curve | EvalResult],
    *,
    title: str | None = None,
    fars: Sequence[float] = (),
    dpi: int = 120,
) -> Path:
    """Plot TAR against FAR (log x) for each named curve; ``fars`` draws reference lines.

    Uses matplotlib's Agg canvas directly, so it never touches pyplot state or needs a display.
    Points with FAR = 0 cannot sit on a log axis and are dropped.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xmin = 1.0
    for name, item in curves.items():
        curve = item.curve if isinstance(item, EvalResult) else item
        if curve is None:
            continue
        keep = curve.fpr > 0
        if not keep.any():
            continue
        ax.plot(curve.fpr[keep], curve.tpr[keep], label=name, linewidth=1.5)
        xmin = min(xmin, float(curve.fpr[keep].min()))
    for far in fars:
        ax.axvline(far, color="0.8", linewidth=0.8, linestyle="--", zorder=0)
    ax.set_xscale("log")
    ax.set_xlim(min(max(xmin, 1e-8), 1e-3), 1.0)  # at least three decades, even for tiny pair sets
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.grid(True, which="major", alpha=0.3)
    if title:
        ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=dpi, bbox_inches="tight")
    return path
