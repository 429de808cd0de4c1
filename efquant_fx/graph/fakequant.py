"""Training with fused fake-quant ops: Brevitas's grid and gradients, a fraction of its time per step.

Brevitas quantizes through chains of small Python-level autograd functions (scale, divide, round-STE,
clamp, multiply, each a full-size tensor and a backward node). In a training step that overhead
more than doubles the cost of a MobileFaceNet step on CPU. Inside :func:`fast_fake_quant`:

* a per-channel abs-max weight quantizer becomes one ``torch.fake_quantize_per_channel_affine`` with
  the scale Brevitas computes (max |w| per channel over the narrow integer range), gradient
  straight-through to the weight. Brevitas also sends a gradient through the abs-max scale into each
  channel's largest weight; that term is dropped here.
* an activation point becomes one fused ``fake_quantize_per_tensor_affine`` with the scale
  (and zero point) Brevitas derives from its learnable parameters, so the LSQ gradient reaches the
  same parameters, with the same formula (``round(x/s + z) - z - x/s`` inside the range, the clamped
  value outside).

The parameters the optimizer holds and the state dict are Brevitas's, unchanged; layers this path does
not cover (another weight estimator, asymmetric weights) keep the Brevitas forward. Each patched
layer is checked on entry: its scale must equal the one ``quant_weight()`` reports.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from efquant_fx.graph.frozen import layer_functional, patched_forwards, swappable_layer
from efquant_fx.graph.modules import ActQuant


def _weight_forward(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The fused forward of a symmetric per-channel abs-max weight quantizer; None if it is another kind."""
    with torch.no_grad():
        qt = layer.quant_weight()
        if not bool(qt.signed) or bool((qt.zero_point != 0).any()):
            return None
        bits = int(qt.bit_width)
        qmax = 2 ** (bits - 1) - 1
        scale = qt.scale.detach().flatten()
        if scale.numel() != layer.weight.shape[0]:
            return None
        absmax = layer.weight.detach().abs().flatten(1).amax(dim=1)
        if not torch.allclose(absmax / qmax, scale, rtol=1e-5, atol=1e-12):
            return None
    forward = layer_functional(layer)
    zero = torch.zeros(layer.weight.shape[0], dtype=torch.int32, device=layer.weight.device)

    def run(x: torch.Tensor) -> torch.Tensor:
        w = layer.weight
        s = (w.detach().abs().flatten(1).amax(dim=1) / qmax).clamp_min(1e-12)
        return forward(x, torch.fake_quantize_per_channel_affine(w, s, zero, 0, -qmax, qmax))

    return run


class _LearnableFakeQuant(torch.autograd.Function):
    """Per-tensor fake quant with LSQ gradients for scale and zero point.

    ``torch._fake_quantize_learnable_per_tensor_affine`` computes the same gradients but its backward
    alone cost a quarter of a MobileFaceNet step on CPU; here they are two dot products over tensors
    the step keeps anyway (the input, the output and a bool mask of the values inside the range).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, lo: int, hi: int):
        s, z = float(scale), int(round(float(zero_point)))
        dtype, x = x.dtype, x.float()  # under autocast the input may be half precision
        y, inside = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(x, s, z, lo, hi)
        ctx.save_for_backward(x, y, inside)
        ctx.s, ctx.dtype = s, dtype
        return y.to(dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, y, inside = ctx.saved_tensors
        g = g.float()
        gx = torch.where(inside, g, g.new_zeros(()))
        grad_scale = grad_zero = None
        if ctx.needs_input_grad[1]:  # inside: (y - x) / s; outside: y / s (the clamped level minus z)
            grad_scale = (torch.dot(g.flatten(), y.flatten()) - torch.dot(gx.flatten(), x.flatten())) / ctx.s
            grad_scale = grad_scale.reshape(1)
        if ctx.needs_input_grad[2]:  # outside the range the output moves by -s per unit of zero point
            grad_zero = (-ctx.s * (g.sum() - gx.sum())).reshape(1)
        return gx.to(ctx.dtype), grad_scale, grad_zero, None, None


def _act_forward(point: ActQuant) -> Callable[[torch.Tensor], torch.Tensor]:
    act_quant = point.quant.act_quant
    device = next(iter(point.parameters()), torch.empty(0)).device
    probe = torch.zeros(1, device=device)
    with torch.no_grad():
        qt = act_quant(probe)
    bits = int(qt.bit_width)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if bool(qt.signed) else (0, 2**bits - 1)

    def run(x: torch.Tensor) -> torch.Tensor:
        if point.mode != "quant":  # observing again (a fine-tune's calibration steps)
            return ActQuant.forward(point, x)
        q = act_quant(probe)  # a one-element pass: the scale and zero point, with their gradients
        return _LearnableFakeQuant.apply(x, q.scale.reshape(1), q.zero_point.reshape(1), lo, hi)

    return run


def _fused_forward(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if isinstance(m, ActQuant):  # any mode: a fine-tune may observe first, then quantize
        return _act_forward(m)
    return _weight_forward(m) if swappable_layer(m) else None


def fast_fake_quant(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """Within the block, ``model``'s quantized layers and activation points train through fused
    fake-quant ops; the Brevitas forward is restored on exit (also after an exception)."""
    return patched_forwards(model, _fused_forward)
