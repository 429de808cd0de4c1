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
from contextlib import AbstractContextManager, contextmanager

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


def swappable_layer(m: nn.Module) -> bool:
    """A Brevitas conv/linear whose forward is ``layer_functional`` with a quantized weight."""
    return isinstance(m, QuantConv2d) and m.padding_mode == "zeros" or isinstance(m, QuantLinear)


@contextmanager
def patched_forwards(model: nn.Module, forward_for: Callable[[nn.Module], Callable | None]) -> Iterator[nn.Module]:
    """Within the block every module for which ``forward_for`` gives a function runs that function; the
    class forward is restored on exit (also after an exception). A module patched already (a nested
    block) is left to the outer block."""
    patched = []
    for m in model.modules():
        if "forward" in vars(m):
            continue
        run = forward_for(m)
        if run is not None:
            m.forward = run  # type: ignore[method-assign]
            patched.append(m)
    try:
        yield model
    finally:
        for m in patched:
            del m.forward


@torch.no_grad()
def _frozen_forward(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if isinstance(m, ActQuant) and m.mode == "quant":
        return _point_forward(m)
    return _layer_forward(m) if swappable_layer(m) else None


def frozen_quantizers(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """Within the block ``model`` runs with weights quantized once and activation points as plain
    arithmetic; the Brevitas forward is restored on exit (also after an exception)."""
    return patched_forwards(model, _frozen_forward)
