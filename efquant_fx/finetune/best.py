"""The best evaluated weights: fine-tuning can overshoot, so the run ends with the best it saw."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from efquant_fx.errors import EfquantError


@dataclass
class BestWeights:
    """Best value of ``metric`` so far (default: the evaluator's first metric), its step and weights."""

    metric: str | None = None
    higher_is_better: bool = True
    value: float | None = None
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    state: dict[str, Tensor] | None = None  # a CPU copy of the student's state dict at ``step``

    @classmethod
    def from_checkpoint(cls, saved: Mapping[str, Any], metric: str | None, higher_is_better: bool,
                        load_weights: Callable[[], dict[str, Tensor] | None]) -> BestWeights:
        """Resume the tracker from ``last.pt``'s summary; ``load_weights`` reads ``best.pt``'s, if any."""
        best = cls(metric or saved["metric"], higher_is_better, saved["value"], saved["step"], dict(saved["metrics"]))
        if best.step is not None:
            best.state = load_weights()
        return best

    def summary(self) -> dict[str, Any]:
        """What ``last.pt`` keeps of the tracker (the weights are in ``best.pt``)."""
        return {"metric": self.metric, "value": self.value, "step": self.step, "metrics": self.metrics}

    def offer(self, step: int, metrics: dict[str, float], student: nn.Module) -> bool:
        """Keep ``student``'s weights if ``metrics`` beat the best so far; True when they did."""
        if not metrics:
            return False
        if self.metric is None:
            self.metric = next(iter(metrics))
        if self.metric not in metrics:
            raise EfquantError(f"the evaluator returned no {self.metric!r} (it returned {sorted(metrics)})",
                               field="best_metric")
        value = metrics[self.metric]
        better = self.value is None or (value > self.value if self.higher_is_better else value < self.value)
        if not (better and math.isfinite(value)):
            return False
        self.value, self.step, self.metrics = value, step, metrics
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in student.state_dict().items()}
        return True

    def restore(self, student: nn.Module, step: int) -> str | None:
        """Load the best weights into ``student`` unless they are the ones at ``step``; returns a note."""
        if self.state is None or self.step == step:
            return None
        student.load_state_dict(self.state)
        return f"fine-tune: kept the best evaluated weights, step {self.step} ({self.metric}={self.value:.4f})"
