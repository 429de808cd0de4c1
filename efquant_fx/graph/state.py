"""Make a freshly rewritten graph accept a state dict saved from a calibrated / fine-tuned one.

Data-driven steps add parameters the bare rewrite does not have: bias correction gives bias-free
layers a bias, and weight scales found on first use (MSE search, learned scales) only exist once a
layer has quantized its weight. Both reloaders (:func:`efquant_fx.load_result` and
:func:`efquant_fx.export.load_packed`) call :func:`fit_to_state` before ``load_state_dict``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["fit_to_state"]


def fit_to_state(gm: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Create the parameters ``state`` holds that ``gm`` lacks because they come from data."""
    _adopt_extra_biases(gm, state)
    _init_lazy_weight_quant(gm, state)


def _adopt_extra_biases(gm: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Bias correction can give a bias-free layer a bias: create those parameters before loading."""
    have = gm.state_dict()
    for key in [k for k in state if k not in have and k.endswith(".bias")]:
        try:
            module = gm.get_submodule(key[: -len(".bias")])
        except AttributeError:  # not this architecture: reported by the caller's key check
            continue
        if getattr(module, "bias", "missing") is None:
            module.bias = nn.Parameter(torch.zeros_like(state[key]))


@torch.no_grad()
def _init_lazy_weight_quant(gm: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Weight scales initialised on first use (MSE search, learned scales) only create their
    parameters then: run that first use for the layers whose stored state holds such tensors."""
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    have = gm.state_dict()
    for name, layer in gm.named_modules():
        if not isinstance(layer, QuantWeightBiasInputOutputLayer):
            continue
        prefix = f"{name}.weight_quant."
        if any(k.startswith(prefix) and k not in have for k in state):
            layer.quant_weight()
