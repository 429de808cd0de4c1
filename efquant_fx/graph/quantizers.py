"""Brevitas quantizer choices, composed from recipe fields (Brevitas injectors, not our own math)."""

from __future__ import annotations

import brevitas.nn as qnn
import torch
from brevitas.core.zero_point import ParameterZeroPoint
from brevitas.inject.enum import ScalingImplType
from brevitas.quant import (
    Int8ActPerTensorFloatMinMaxInit,
    Int8WeightPerChannelFloat,
    Int8WeightPerChannelFloatMSE,
    Int8WeightPerTensorFloat,
    Int8WeightPerTensorFloatMSE,
    ShiftedUint8ActPerTensorFloat,
    ShiftedUint8WeightPerChannelFloat,
    ShiftedUint8WeightPerChannelFloatMSE,
    ShiftedUint8WeightPerTensorFloat,
    ShiftedUint8WeightPerTensorFloatMSE,
)
from torch import nn


class AsymActMinMaxInit(ShiftedUint8ActPerTensorFloat):
    """Asymmetric per-tensor activation quantizer whose scale and zero point are learnable parameters
    initialised from an observed range (Brevitas's shipped asymmetric quantizer collects its own stats)."""

    scaling_impl_type = ScalingImplType.PARAMETER
    scaling_init = 1.0
    zero_point_impl = ParameterZeroPoint
    zero_point_init = 0.0
    zero_point_shape = ()
    zero_point_stats_input_view_shape_impl = None


_WEIGHT_QUANT = {
    # (symmetric, per_channel, estimator) -> injector
    (True, True, "minmax"): Int8WeightPerChannelFloat,
    (True, False, "minmax"): Int8WeightPerTensorFloat,
    (True, True, "mse"): Int8WeightPerChannelFloatMSE,
    (True, False, "mse"): Int8WeightPerTensorFloatMSE,
    (False, True, "minmax"): ShiftedUint8WeightPerChannelFloat,
    (False, False, "minmax"): ShiftedUint8WeightPerTensorFloat,
    (False, True, "mse"): ShiftedUint8WeightPerChannelFloatMSE,
    (False, False, "mse"): ShiftedUint8WeightPerTensorFloatMSE,
}


def weight_quant(symmetric: bool, per_channel: bool, estimator: str):
    return _WEIGHT_QUANT[(symmetric, per_channel, estimator)]


def make_act_quantizer(bits: int, symmetric: bool) -> qnn.QuantIdentity:
    """A learnable per-tensor activation quantizer; its range is set later by :func:`set_act_range`."""
    if symmetric:
        return qnn.QuantIdentity(
            act_quant=Int8ActPerTensorFloatMinMaxInit, min_val=-1.0, max_val=1.0, bit_width=bits,
            return_quant_tensor=False,
        )
    return qnn.QuantIdentity(act_quant=AsymActMinMaxInit, bit_width=bits, return_quant_tensor=False)


def set_act_range(quant: qnn.QuantIdentity, lo: float, hi: float, symmetric: bool) -> None:
    """Point a quantizer from :func:`make_act_quantizer` at the float range [lo, hi]."""
    tensor_quant = quant.act_quant.fused_activation_quant_proxy.tensor_quant
    eps = 1e-8
    with torch.no_grad():
        if symmetric:
            tensor_quant.scaling_impl.value.fill_(max(abs(lo), abs(hi), eps))
        else:
            tensor_quant.scaling_impl.value.fill_(max(hi - lo, eps))
            tensor_quant.zero_point_impl.value.fill_(abs(min(lo, 0.0)))


def quant_layer_from(module: nn.Module, bits: int, symmetric: bool, per_channel: bool, estimator: str) -> nn.Module:
    """A Brevitas QuantConv2d/QuantLinear that carries ``module``'s weights (bias stays float)."""
    wq = weight_quant(symmetric, per_channel, estimator)
    common = dict(weight_quant=wq, weight_bit_width=bits, input_quant=None, output_quant=None, bias_quant=None,
                  return_quant_tensor=False)
    if isinstance(module, nn.Conv2d):
        q = qnn.QuantConv2d(
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=module.groups,
            bias=module.bias is not None, padding_mode=module.padding_mode, **common,
        )
    elif isinstance(module, nn.Linear):
        q = qnn.QuantLinear(module.in_features, module.out_features, bias=module.bias is not None, **common)
    else:
        raise TypeError(f"cannot quantize {type(module).__name__}")
    with torch.no_grad():
        q.weight.copy_(module.weight)
        q.weight.requires_grad_(module.weight.requires_grad)
        if module.bias is not None:
            q.bias.copy_(module.bias)
    return q.to(module.weight.device)
