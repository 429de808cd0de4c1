"""What an evaluator hands back: flat numbers for tables/JSON plus an optional ROC curve for plots."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Curve:
    """A ROC curve as false-accept rate (x) and true-accept rate (y), both in [0, 1]."""

    fpr: np.ndarray
    tpr: np.ndarray

    def __post_init__(self) -> None:
        fpr = np.asarray(self.fpr, dtype=np.float64).reshape(-1)
        tpr = np.asarray(self.tpr, dtype=np.float64).reshape(-1)
        if fpr.shape != tpr.shape:
            raise ValueError(f"fpr and tpr differ in length: {fpr.shape[0]} vs {tpr.shape[0]}")
        object.__setattr__(self, "fpr", fpr)
        object.__setattr__(self, "tpr", tpr)


@dataclass
class EvalResult:
    """One benchmark's outcome for one model.

    ``metrics`` is flat ``{name: float}`` so that reports, JSON and recipes' acceptance checks can treat
    every protocol alike; ``info`` carries non-metric facts (pair counts, thresholds, timings).
    """

    name: str
    protocol: str
    metrics: dict[str, float]
    curve: Curve | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.metrics = {str(k): float(v) for k, v in self.metrics.items()}


def far_key(far: float) -> str:
    """Metric name for TAR at a given FAR, e.g. ``tar@far=1e-4`` (stable, readable, sortable by eye)."""
    mantissa, exponent = f"{far:.0e}".split("e")
    exp = int(exponent)
    if mantissa == "1":
        return f"tar@far=1e{exp}"
    return f"tar@far={far:g}"
