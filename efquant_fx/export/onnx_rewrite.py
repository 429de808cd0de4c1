"""Exact, value-preserving rewrites of an exported QCDQ graph so onnxruntime picks integer kernels.

- ``activations_to_uint8``: Brevitas exports symmetric activations as int8 Q/DQ (zero point 0).
  On x86, onnxruntime only fuses ``QLinearConv``/``QLinearAdd`` for uint8 activations; its own
  S8->U8 pass skips a Q whose output feeds several DQs (every residual branch point), which then
  leaves those convs and adds in float. ``q_u8 = q_s8 + 128`` with zero point ``zp + 128`` gives
  the same dequantized values, so we convert every activation Q/(Clip)/DQ chain ourselves.
- ``drop_initializer_inputs``: initializers listed as graph inputs block constant folding.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def drop_initializer_inputs(model: onnx.ModelProto) -> int:
    graph = model.graph
    names = {i.name for i in graph.initializer}
    keep = [i for i in graph.input if i.name not in names]
    dropped = len(graph.input) - len(keep)
    del graph.input[:]
    graph.input.extend(keep)
    return dropped


def activations_to_uint8(model: onnx.ModelProto) -> int:
    """Convert int8 activation Q -> [Clip] -> DQ chains to uint8; returns how many Qs changed."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    made: dict[tuple[bytes, tuple[int, ...]], str] = {}

    def shifted(name: str) -> str | None:
        if name not in inits:
            return None
        value = numpy_helper.to_array(inits[name])
        if value.dtype != np.int8:
            return None
        u8 = (value.astype(np.int16) + 128).astype(np.uint8)
        key = (u8.tobytes(), u8.shape)
        if key not in made:
            new_name = f"{name}__u8"
            while new_name in inits:
                new_name += "_"
            tensor = numpy_helper.from_array(u8, new_name)
            graph.initializer.append(tensor)
            inits[new_name] = tensor
            made[key] = new_name
        return made[key]

    changed = 0
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        if len(q.input) < 3 or q.input[0] in inits:  # weights are stored as ints; only activations
            continue
        chain, frontier, ok = [], [q.output[0]], True
        while frontier and ok:
            for user in consumers.get(frontier.pop(), []):
                if user.op_type == "Clip" and len(user.input) == 3:
                    chain.append(user)
                    frontier.append(user.output[0])
                elif user.op_type == "DequantizeLinear" and len(user.input) == 3:
                    chain.append(user)
                else:
                    ok = False
        zero_point = shifted(q.input[2])
        if not ok or zero_point is None:
            continue
        bounds = {}
        for node in chain:
            if node.op_type == "Clip":
                for k in (1, 2):
                    bounds[(id(node), k)] = shifted(node.input[k])
            elif node.input[2] != q.input[2]:
                ok = False
        if not ok or any(v is None for v in bounds.values()):
            continue
        q.input[2] = zero_point
        for node in chain:
            if node.op_type == "Clip":
                node.input[1], node.input[2] = bounds[(id(node), 1)], bounds[(id(node), 2)]
            else:
                node.input[2] = zero_point
        changed += 1
    used = {name for node in graph.node for name in node.input}
    unused = [i for i in graph.initializer if i.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)
    return changed


def set_batch_dim(model: onnx.ModelProto, name: str = "N") -> None:
    """Name the first dimension of every graph input and output (insightface's tools expect it symbolic)."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = name
