"""The modules the graph rewrite inserts: activation quant points and a slope-keeping quant PReLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from brevitas.function.ops_ste import round_ste
from torch import nn

from efquant_fx.graph.observers import make_observer, observed_range
from efquant_fx.graph.quantizers import make_act_quantizer, set_act_range


class ActQuant(nn.Module):
    """One activation quantization point.

    Modes: ``observe`` (float pass-through while a torch.ao observer records the range),
    ``quant`` (Brevitas fake-quant with a learnable scale initialised from that range),
    ``float`` (disabled, for sensitivity checks).
    """

    def __init__(self, bits: int, symmetric: bool, observer: str = "minmax", percentile: float = 99.99):
        super().__init__()
        self.bits = bits
        self.symmetric = symmetric
        self.observer_kind = observer
        self.percentile = percentile
        self.quant = make_act_quantizer(bits, symmetric)
        self.observer: nn.Module | None = None
        self.mode = "quant"
        self.range: tuple[float, float] | None = None

    def start_observing(self) -> None:
        self.observer = make_observer(self.observer_kind, self.bits, self.symmetric, self.percentile)
        self.mode = "observe"

    def freeze(self) -> tuple[float, float]:
        """Set the quantizer from what was observed, drop the observer and start quantizing."""
        if self.observer is None:
            raise RuntimeError("freeze() called before start_observing()")
        lo, hi = observed_range(self.observer)
        set_act_range(self.quant, lo, hi, self.symmetric)
        self.range = (lo, hi)
        self.observer = None
        self.mode = "quant"
        return lo, hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "quant":
            return self.quant(x)
        if self.mode == "observe" and self.observer is not None:
            self.observer(x.detach().float())
        return x

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, observer={self.observer_kind}, mode={self.mode}"


class QuantPReLU(nn.Module):
    """PReLU that keeps its learned per-channel slopes (Brevitas has no PReLU layer and its default
    mapping rebuilds PReLU from scratch, losing them). Optionally fake-quantizes the slopes
    (per-tensor, symmetric, as QuantFace does); the output is quantized by the next ActQuant."""

    def __init__(self, prelu: nn.PReLU, slope_bits: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(prelu.weight.detach().clone(), requires_grad=prelu.weight.requires_grad)
        self.num_parameters = prelu.num_parameters
        self.slope_bits = slope_bits

    def quantized_slopes(self) -> torch.Tensor:
        if not self.slope_bits:
            return self.weight
        qmax = 2 ** (self.slope_bits - 1) - 1
        scale = self.weight.detach().abs().max().clamp_min(1e-8) / qmax
        return torch.clamp(round_ste(self.weight / scale), -qmax, qmax) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.prelu(x, self.quantized_slopes())

    def extra_repr(self) -> str:
        return f"num_parameters={self.num_parameters}, slope_bits={self.slope_bits}"
