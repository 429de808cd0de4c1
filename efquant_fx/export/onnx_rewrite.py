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


def prelu_to_elementwise(model: onnx.ModelProto) -> int:
    """Replace every ``PRelu(x, s)`` by bit-identical elementwise ops; returns how many changed.

    onnxruntime's CPU ``PRelu`` is a slow broadcasting kernel (profiled: it dominated MobileFaceNet's
    int8 run); ``Mul`` by a per-channel constant and ``Max`` of two tensors are its fast paths. With
    every slope <= 1, ``PRelu(x) = Max(x, s * x)``. Trained face backbones have a few slopes > 1 in
    most layers; there, with ``d = -1`` on
    those channels and ``+1`` elsewhere, ``PRelu(x) = d * Max(d * x, (d * s) * x)``. Both are exact:
    the products are PRelu's own ``s * x`` up to sign flips, which round nothing.
    Slopes that are not constants (initializers, possibly behind ``Identity`` nodes, which the
    exporter uses for repeated values) are left as ``PRelu``.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def constant_value(name: str) -> np.ndarray | None:
        for _ in range(len(graph.node) + 1):
            if name in inits:
                return numpy_helper.to_array(inits[name])
            node = producer.get(name)
            if node is None or node.op_type != "Identity":
                return None
            name = node.input[0]
        return None

    names = {o for n in graph.node for o in n.output} | set(inits) | {i.name for i in graph.input}

    def fresh(base: str) -> str:
        name, i = base, 0
        while name in names:
            i += 1
            name = f"{base}_{i}"
        names.add(name)
        return name

    def constant(base: str, value: np.ndarray) -> str:
        name = fresh(base)
        tensor = numpy_helper.from_array(value, name)
        graph.initializer.append(tensor)
        inits[name] = tensor
        return name

    new_nodes: list[onnx.NodeProto] = []
    changed = 0
    make = onnx.helper.make_node
    for node in graph.node:
        slope = constant_value(node.input[1]) if node.op_type == "PRelu" else None
        if slope is None or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        x, slope_name = node.input[0], node.input[1]
        (y,) = node.output
        base = node.name or y
        if np.all(slope <= 1):
            scaled = fresh(f"{base}_scaled")
            new_nodes += [make("Mul", [x, slope_name], [scaled], name=fresh(f"{base}/Mul")),
                          make("Max", [x, scaled], [y], name=fresh(f"{base}/Max"))]
        else:
            sign = np.where(slope > 1, -1, 1).astype(slope.dtype)
            d, ds = constant(f"{slope_name}_sign", sign), constant(f"{slope_name}_signed", sign * slope)
            dx, dsx, top = fresh(f"{base}_dx"), fresh(f"{base}_dsx"), fresh(f"{base}_max")
            new_nodes += [make("Mul", [x, d], [dx], name=fresh(f"{base}/MulSign")),
                          make("Mul", [x, ds], [dsx], name=fresh(f"{base}/MulSlope")),
                          make("Max", [dx, dsx], [top], name=fresh(f"{base}/Max")),
                          make("Mul", [top, d], [y], name=fresh(f"{base}/Unsign"))]
        changed += 1
    if changed:
        del graph.node[:]
        graph.node.extend(new_nodes)
    used = {name for n in graph.node for name in n.input}
    for tensor in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(tensor)
    return changed


def shorten_tensor_names(model: onnx.ModelProto) -> int:
    """Rename internal tensors ``t0, t1, ...``; returns the bytes saved.

    The exporter names each tensor after its trace path
    (``/layers.0/weight_quant/export_handler_38/Constant_2_output_0``): on MobileFaceNet those
    names were 6 % of the int8 file, more than its float biases and scales together. Graph inputs
    and outputs keep their names (``data``, the embedding); node names, which say which layer an op
    belongs to, are kept too.
    """
    graph = model.graph
    before = model.ByteSize()
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}
    used = keep | {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            new = f"t{len(names)}"
            while new in used and new not in names:
                new += "_"
            names[name] = new
        return names[name]

    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
    for node in graph.node:
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    for info in graph.value_info:
        info.name = short(info.name)
    return before - model.ByteSize()
