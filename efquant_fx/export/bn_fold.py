"""Fold BatchNorm into convs that are already quantized, for integer kernels.

A recipe with ``quant.batchnorm: keep`` (QuantFace's choice, and what fine-tuning with BN in the
graph needs) leaves ``QuantConv2d -> BatchNorm2d``. onnxruntime only runs ``DQ -> Conv -> Q`` as
``QLinearConv`` and cannot fold a BN into a conv whose weights are a DequantizeLinear output, so
the BN would stay a float op between a dequantize and a quantize. Folded after quantization, the
per-channel BN scale multiplies each output channel's weights and their Brevitas per-channel
scale alike: the integer weights stay the same (sign-flipped where gamma < 0). That holds for
statistics-based per-channel scales; :func:`fold_quantized_batchnorm` counts the integer weights
that moved, so a per-tensor recipe learns what folding cost it instead of assuming.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn


@dataclass
class FoldReport:
    folded: int = 0
    int_weights: int = 0
    int_weights_changed: int = 0

    def note(self) -> str:
        moved = (f"; {self.int_weights_changed} of {self.int_weights} integer weights changed"
                 if self.int_weights_changed else "; integer weights unchanged")
        return f"folded {self.folded} BatchNorm(s) into their quantized convs{moved}"


def _int_weights(conv: nn.Module) -> torch.Tensor:
    return conv.quant_weight().int().to(torch.int32)


@torch.no_grad()
def fold_quantized_batchnorm(gm: fx.GraphModule) -> FoldReport:
    """Fold every eval-mode ``BatchNorm2d`` that is a Brevitas ``QuantConv2d``'s only user into it.

    Modifies ``gm`` in place (pass a copy).
    """
    from brevitas.nn import QuantConv2d

    report = FoldReport()
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                and isinstance(gm.get_submodule(src.target), QuantConv2d)):
            continue
        bn: nn.BatchNorm2d = gm.get_submodule(node.target)
        conv = gm.get_submodule(src.target)
        if bn.running_var is None or bn.running_mean is None:
            continue  # batch statistics only: nothing fixed to fold
        before = _int_weights(conv)
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.dim() - 1))).to(conv.weight))
        if conv.bias is None:
            conv.bias = nn.Parameter(shift.to(conv.weight), requires_grad=False)
        else:
            conv.bias.copy_(conv.bias * scale + shift)
        after = _int_weights(conv)
        sign = torch.where(scale < 0, -1, 1).view(-1, *([1] * (before.dim() - 1))).to(before)
        report.int_weights += before.numel()
        report.int_weights_changed += int((after != before * sign).sum())
        report.folded += 1
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        parent, _, attr = str(node.target).rpartition(".")
        delattr(gm.get_submodule(parent) if parent else gm, attr)
    if report.folded:
        gm.graph.lint()
        gm.recompile()
    return report
