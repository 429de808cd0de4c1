"""Inference with the quantizers frozen: the same numbers as the Brevitas forward, a fraction of the time.

Brevitas re-derives every weight's scale and re-quantizes it on every forward, and runs each
activation point through a chain of small Python-level ops. For inference (evaluation, capturing
layer inputs for learned rounding) the weights can be fake-quantized once and each activation point
reduced to ``clamp(round(x / s), lo, hi) * s`` with the scale Brevitas would use, which is Brevitas's
own arithmetic without its overheads. Training keeps the Brevitas forward (its straight-through
gradients and learnable scales are the point there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from brevitas.nn import QuantConv2d, QuantLinear
from torch import nn

from efquant_fx.graph.modules import ActQuant


def _point_forward(point: ActQuant):
    device = next(iter(point.parameters()), torch.empty(0)).device
    qt = point.quant.act_quant(torch.zeros(1, device=device))
    scale, zero_point, bits = qt.scale.detach(), qt.zero_point.detach(), int(qt.bit_width)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if bool(qt.signed) else (0, 2**bits - 1)
    if bool((zero_point != 0).any()):
        return lambda x: (torch.clamp(torch.round(x / scale + zero_point), lo, hi) - zero_point) * scale
    return lambda x: torch.clamp(torch.round(x / scale), lo, hi) * scale


def layer_functional(layer: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x, weight) -> output`` of a Brevitas conv/linear with any weight (its bias and geometry kept)."""
    if isinstance(layer, QuantConv2d):
        return lambda x, w: F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return lambda x, w: F.linear(x, w, layer.bias)


def _layer_forward(layer: nn.Module):
    weight = layer.quant_weight().value.detach().clone()
    forward = layer_functional(layer)
    return lambda x: forward(x, weight)


@contextmanager
def frozen_quantizers(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``model`` runs with weights quantized once and activation points as plain
    arithmetic; the Brevitas forward is restored on exit (also after an exception)."""
    patched = []
    with torch.no_grad():
        for m in model.modules():
            if "forward" in vars(m):  # frozen already (a nested call): the outer block restores it
                continue
            if isinstance(m, ActQuant) and m.mode == "quant":
                m.forward = _point_forward(m)  # type: ignore[method-assign]
            elif isinstance(m, QuantConv2d) and m.padding_mode == "zeros" or isinstance(m, QuantLinear):
                m.forward = _layer_forward(m)  # type: ignore[method-assign]
            else:
                continue
            patched.append(m)
    try:
        yield model
    finally:
        for m in patched:
            del m.forward
