"""Baselines the head-to-head benchmark measures against: what a user gets from a stock toolkit.

Not part of the package: ``benchmarks/compare.py`` runs them, ``tests/test_benchmark_baselines.py``
checks them.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from efquant_fx.errors import EfquantError
from efquant_fx.export.torch_int8 import FloatPReLU, pick_engine


def default_ptq(model: nn.Module, batches: Sequence[torch.Tensor], *, engine: str = "x86",
                keep_prelu_float: bool = True) -> fx.GraphModule:
    """Plain torch.ao FX post-training quantization of a *float* model: the baseline a user gets from
    ``get_default_qconfig_mapping(engine)`` + ``prepare_fx`` / calibrate / ``convert_fx`` (8-bit,
    per-channel weights, histogram activation observers; on x86 ``reduce_range`` activations, BN fused).

    ``keep_prelu_float`` swaps PReLU for :class:`FloatPReLU` first, as :func:`lower` does: torch 2.13's
    stock PReLU lowering gives wrong values (see the module docstring), so the stock mapping would
    measure that bug. Unlike :func:`lower`, the float PReLU are not replaced afterwards.
    """
    if engine not in torch.backends.quantized.supported_engines:
        engine = pick_engine()
    if not batches:
        raise EfquantError("torch.ao PTQ needs calibration batches", field="calibration")
    torch.backends.quantized.engine = engine
    from efquant_fx.graph.quantize import set_module
    from efquant_fx.graph.trace import trace

    gm = copy.deepcopy(model).cpu().eval()
    gm = gm if isinstance(gm, fx.GraphModule) else trace(gm)
    if keep_prelu_float:
        for name, m in list(gm.named_modules()):
            if isinstance(m, nn.PReLU):
                set_module(gm, name, FloatPReLU(m.weight))
        gm.recompile()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        custom = PrepareCustomConfig().set_non_traceable_module_classes([FloatPReLU])
        prepared = prepare_fx(gm, get_default_qconfig_mapping(engine), (batches[0][:1].cpu(),),
                              prepare_custom_config=custom)
        with torch.no_grad():
            for x in batches:
                prepared(x.cpu())
        return convert_fx(prepared)
