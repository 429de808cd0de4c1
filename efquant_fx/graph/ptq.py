"""Post-training steps, each a thin call into the library that already implements it.

BatchNorm folding comes from ``torch.fx.experimental.optimization.fuse``; equalization, bias
correction and GPTQ from Brevitas. BatchNorms with no conv/linear in front of them (the
pre-activation ``bn1`` of every insightface block and the head ``bn2``) cannot be folded exactly
(zero padding of the next conv) and stay float; the layer report counts them.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every Conv->BN and Linear->BN1d pair (eval-mode statistics)."""
    from torch.fx.experimental.optimization import fuse

    gm.eval()
    return fuse(gm, inplace=True, no_trace=True)


def cross_layer_equalization(gm: fx.GraphModule, iterations: int) -> fx.GraphModule:
    """Brevitas ``EqualizeGraph`` (weight-only cross-layer equalization) on the float graph."""
    from brevitas.graph.equalize import EqualizeGraph

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EqualizeGraph(iterations=iterations).apply(gm)


@torch.no_grad()
def activation_equalization(gm: fx.GraphModule, alpha: float, batches: Iterable[torch.Tensor],
                            device: torch.device | str = "cpu") -> fx.GraphModule:
    """Brevitas SmoothQuant-style activation equalization, folded into the float graph."""
    from brevitas.graph.equalize import activation_equalization_mode

    gm.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with activation_equalization_mode(gm, alpha, layerwise=False, add_mul_node=False):
            for x in batches:
                gm(x.to(device))
    return gm


@torch.no_grad()
def bias_correction(gm: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> None:
    """Brevitas bias correction: removes the mean output shift each quantized layer introduces."""
    from brevitas.graph.calibrate import bias_correction_mode

    gm.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with bias_correction_mode(gm):
            for x in batches:
                gm(x.to(device))


class _Hidden(nn.Module):
    """Hides a layer from Brevitas's module walk (GPTQ has no exclude list) while still calling it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        object.__setattr__(self, "inner", inner)

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


@torch.no_grad()
def gptq(gm: fx.GraphModule, batches: Sequence[torch.Tensor], exclude: Sequence[str] = ("^fc$",),
         act_order: bool = True, device: torch.device | str = "cpu") -> list[str]:
    """Brevitas GPTQ over the quantized layers, skipping ``exclude`` (by default the 25088-input
    ``fc``, whose Hessian alone is larger than the rest of the model's together)."""
    from brevitas.graph.gptq import gptq_mode
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    from efquant_fx.graph.quantize import set_module

    hidden = [name for name, m in gm.named_modules()
              if isinstance(m, QuantWeightBiasInputOutputLayer) and any(re.search(p, name) for p in exclude)]
    originals = {name: gm.get_submodule(name) for name in hidden}
    for name, module in originals.items():
        set_module(gm, name, _Hidden(module))
    gm.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with gptq_mode(gm, act_order=act_order, use_quant_activations=True) as g:
                for _ in range(g.num_layers):
                    for x in batches:
                        g.model(x.to(device))
                    g.update()
    finally:
        for name, module in originals.items():
            set_module(gm, name, module)
    return hidden


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> int:
    """Recompute BN running statistics under the quantized forward (cumulative average)."""
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    saved = [(m, m.momentum) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for x in batches:
            model(x.to(device))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
            m.eval()
    return len(bns)
