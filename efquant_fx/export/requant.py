"""Requantization points on compute-layer outputs, so onnxruntime can run integer kernels.

The compressed graph quantizes layer *inputs* (as Brevitas and QuantFace do); a conv output
flows in float into PReLU or a residual add. onnxruntime only fuses ``DQ -> Conv -> Q`` into
``QLinearConv``, so a conv without a Q after it stays a float conv on dequantized weights (no
speed-up at all). Export therefore adds an 8-bit point after each quantized layer whose output is
not quantized yet and calibrates just those points: this is what int8 hardware does anyway
(int32 accumulator -> requantize), and the added error is measured and reported.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from efquant_fx.graph.modules import ActQuant


def _quant_layer_types() -> tuple[type, ...]:
    from brevitas.nn import QuantConv2d, QuantLinear

    return QuantConv2d, QuantLinear


def _needs_point(gm: fx.GraphModule, node: fx.Node, types: tuple[type, ...]) -> bool:
    if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), types):
        return False
    users = list(node.users)
    already = len(users) == 1 and users[0].op == "call_module" and isinstance(
        gm.get_submodule(users[0].target), ActQuant)
    return not already


@torch.no_grad()
def add_output_points(gm: fx.GraphModule, batches: Sequence[torch.Tensor], *, bits: int = 8,
                      symmetric: bool = True, observer: str = "minmax", percentile: float = 99.99,
                      include_linear: bool = True) -> list[str]:
    """Insert and calibrate an :class:`ActQuant` after every quantized Conv2d (and Linear) output.

    Modifies ``gm`` in place (pass a copy); returns the names of the new points.
    """
    conv, linear = _quant_layer_types()
    types = (conv, linear) if include_linear else (conv,)
    device = next(gm.parameters()).device
    added: list[ActQuant] = []
    names: list[str] = []
    for node in list(gm.graph.nodes):
        if not _needs_point(gm, node, types):
            continue
        name = re.sub(r"[^0-9a-zA-Z_]", "_", str(node.target)) + "_out_quant"
        while hasattr(gm, name):
            name += "_"
        point = ActQuant(bits, symmetric, observer, percentile).to(device)
        gm.add_submodule(name, point)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        added.append(point)
        names.append(name)
    if not added:
        return names
    gm.graph.lint()
    gm.recompile()
    was_training = gm.training
    gm.eval()
    for point in added:
        point.start_observing()
    for x in batches:
        gm(x.to(device))
    for point in added:
        point.freeze()
    gm.train(was_training)
    return names


def act_points_not_quantizing(model: nn.Module) -> list[str]:
    """Quant points left in ``observe``/``float`` mode: they would export as no quantization at all."""
    return [name for name, m in model.named_modules() if isinstance(m, ActQuant) and m.mode != "quant"]
