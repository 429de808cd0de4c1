"""Convert an ONNX face recognizer into a ``torch.fx.GraphModule`` of standard torch modules.

Why our own converter: onnx2torch needs torchvision, which does not install beside our CPU torch
build, and the quantizer wants *real* modules (``nn.Conv2d``, ``nn.Linear``, ``nn.PReLU``,
``nn.BatchNorm*``) and ``operator.add`` residuals, not opaque wrappers.

What the converter does
-----------------------
* ``onnx.checker.check_model`` first; graph inputs that are initializers (SFace lists its weights
  as inputs) are dropped, leaving exactly one real input.
* Constant subgraphs are folded with numpy: ``Constant``, ``DequantizeLinear`` on int8 weights
  (per-tensor, per-axis and opset-21 blocked ``block_size``), weight ``Reshape``/``Transpose``/
  ``Cast``/``Unsqueeze``... so int8-block weights become float tensors.
* Conv -> ``nn.Conv2d``, BatchNormalization -> ``nn.BatchNorm2d``/``1d`` (eval), PRelu ->
  ``nn.PReLU`` (per-channel slopes flattened), Gemm / MatMul(+Add) with a constant weight ->
  ``nn.Linear``, pools -> ``nn.*Pool2d``, Add/Sub/Mul/Div -> ``operator`` functions.
* The batch dim is dynamic: a Reshape whose target starts with the batch (literal 1, 0 or a
  ``Shape`` of the batch) reshapes with ``-1``/``x.size(0)`` instead; ``Shape`` of a runtime tensor
  is folded from static shape inference with the batch kept symbolic.

Input convention (the choice made here)
---------------------------------------
Our datasets produce RGB faces normalised as ``(x - 127.5) / 127.5``. With the default
``normalized_input=True`` the converted module **always takes that input**:

* if the graph starts with its own affine pixel normalisation (a chain of Sub/Add/Mul/Div by
  scalar or per-channel constants applied to the raw 0..255 input, e.g. SFace's
  ``(x - 127.5) * (1/128)``), that chain is removed and replaced by the equivalent affine on our
  input (``x_raw = 127.5 * x + 127.5``), so SFace becomes ``0.99609375 * x``; output is identical
  to the original graph fed the raw pixels;
* if the graph has no such prefix it is assumed to take normalised input already (insightface's
  exported packs do) and nothing is inserted.

``normalized_input=False`` keeps the graph's own input convention untouched. Channel order is
never changed (SFace and insightface models are RGB). The result carries ``input_name``,
``output_name`` and ``meta_preprocessing`` (a dict saying what the graph did and what the module
expects).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from efquant_fx.errors import EfquantError

STANDARD_MEAN = 127.5
STANDARD_STD = 127.5
STANDARD_INPUT = "RGB, (x - 127.5) / 127.5"

__all__ = ["STANDARD_INPUT", "load_onnx_model"]


# --------------------------------------------------------------------------------------------
# Shared pieces (also used by the MXNet importer)
# --------------------------------------------------------------------------------------------


class _GraphBuilder:
    """Accumulates submodules, buffers and FX nodes, then returns one GraphModule."""

    def __init__(self) -> None:
        self.root = nn.Module()
        self.graph = fx.Graph()
        self._taken: set[str] = set()

    def _unique(self, name: str) -> str:
        base = re.sub(r"\W", "_", name) or "m"
        if base[0].isdigit():
            base = "n_" + base
        cand, i = base, 1
        while cand in self._taken or hasattr(nn.Module, cand):
            cand, i = f"{base}_{i}", i + 1
        self._taken.add(cand)
        return cand

    def placeholder(self, name: str) -> fx.Node:
        return self.graph.placeholder(self._unique(name))

    def module(self, name: str, mod: nn.Module, *args: Any) -> fx.Node:
        target = self._unique(name)
        self.root.add_module(target, mod)
        return self.graph.call_module(target, tuple(args))

    def function(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(fn, tuple(args), kwargs or None)

    def method(self, name: str, *args: Any) -> fx.Node:
        return self.graph.call_method(name, tuple(args))

    def constant(self, name: str, value: np.ndarray) -> fx.Node | float:
        """A scalar becomes a Python float in the code; anything else a registered buffer."""
        arr = np.asarray(value)
        if arr.ndim == 0 or (arr.size == 1 and arr.ndim <= 1):
            return float(arr.reshape(()))
        target = self._unique(name)
        self.root.register_buffer(target, _tensor(arr))
        return self.graph.get_attr(target)

    def finish(self, out: fx.Node) -> fx.GraphModule:
        self.graph.output(out)
        self.graph.lint()
        gm = fx.GraphModule(self.root, self.graph, class_name="ImportedFaceModel")
        return gm.eval()


def _attach(gm: fx.GraphModule, **attrs: Any) -> fx.GraphModule:
    """Set metadata attributes that also survive ``copy.deepcopy`` (GraphModule re-inits on copy)."""
    import torch.fx.graph_module as fx_gm

    key = getattr(fx_gm, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")
    gm.meta.setdefault(key, {}).update(attrs)
    for name, value in attrs.items():
        setattr(gm, name, value)
    return gm


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """A float32 copy (numpy views of ONNX/params buffers are read-only)."""
    return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True, order="C"))


def _batchnorm(rank: int | None, gamma, beta, mean, var, eps: float, momentum: float, *, where: str,
               source: str) -> nn.Module:
    """BatchNorm1d/2d in eval mode with the given statistics (momentum in torch's convention)."""
    arrays = [np.asarray(a, dtype=np.float32).reshape(-1) for a in (gamma, beta, mean, var)]
    c = arrays[0].size
    if any(a.size != c for a in arrays):
        raise EfquantError(f"batch-norm parameters have different sizes {[a.size for a in arrays]}",
                           source=source, field=where)
    if rank == 4:
        bn: nn.Module = nn.BatchNorm2d(c, eps=eps, momentum=momentum)
    elif rank in (2, 3):
        bn = nn.BatchNorm1d(c, eps=eps, momentum=momentum)
    else:
        raise EfquantError(f"batch norm on a tensor of rank {rank} is not supported", source=source,
                           field=where)
    with torch.no_grad():
        bn.weight.copy_(_tensor(arrays[0]))
        bn.bias.copy_(_tensor(arrays[1]))
        bn.running_mean.copy_(_tensor(arrays[2]))
        bn.running_var.copy_(_tensor(arrays[3]))
    return bn.eval()


def _prelu(slope: np.ndarray, rank: int | None, *, where: str, source: str) -> nn.PReLU:
    """Per-channel slopes -> ``nn.PReLU(C)``.

    With a known input ``rank`` the slope follows numpy broadcasting (ONNX): its non-1 dim must land
    on axis 1, so (C,1,1) on NCHW is per-channel but (C,) on NCHW (which would scale W) is refused.
    ``rank=None`` means "the slope is per-channel by definition" (MXNet's prelu gamma).
    """
    s = np.asarray(slope, dtype=np.float32)
    if s.size == 1:
        mod = nn.PReLU(1)
    else:
        big = [j for j, d in enumerate(s.shape) if d != 1]
        ok = len(big) == 1 and (rank is None or rank - s.ndim + big[0] == 1)
        if not ok:
            raise EfquantError(
                f"PReLU slope of shape {tuple(s.shape)} is not per-channel for a rank-{rank} input",
                source=source, field=where,
            )
        mod = nn.PReLU(s.size)
    with torch.no_grad():
        mod.weight.copy_(_tensor(s.reshape(-1)))
    return mod


def _affine_to_normalized(scale: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rewrite ``y = scale * raw + offset`` for our input ``x = (raw - 127.5) / 127.5``."""
    a = np.asarray(scale, dtype=np.float64) * STANDARD_STD
    b = np.asarray(scale, dtype=np.float64) * STANDARD_MEAN + np.asarray(offset, dtype=np.float64)
    return a, b


def _emit_affine(builder: _GraphBuilder, x: fx.Node, a: np.ndarray, b: np.ndarray) -> fx.Node:
    """``x * a + b`` with the identity parts left out (SFace needs only the multiply)."""
    if not np.all(a == 1.0):
        x = builder.function(operator.mul, x, builder.constant("input_scale", a))
    if np.any(b != 0.0):
        x = builder.function(operator.add, x, builder.constant("input_offset", b))
    return x


def _preprocessing_meta(chain: list[str], scale: np.ndarray, offset: np.ndarray, normalized_input: bool,
                        stripped: bool) -> dict[str, Any]:
    """What the original graph did to its input and what the converted module expects."""
    graph_norm = None
    if chain:
        graph_norm = {
            "ops": chain,
            "scale": np.asarray(scale, dtype=np.float64).reshape(-1).tolist(),
            "offset": np.asarray(offset, dtype=np.float64).reshape(-1).tolist(),
            "formula": "y = scale * x_raw + offset",
        }
    if normalized_input:
        expects = STANDARD_INPUT
    else:
        expects = "RGB 0..255 (graph normalises itself)" if chain else STANDARD_INPUT + " (assumed)"
    return {
        "graph_normalizes": bool(chain),
        "graph_normalization": graph_norm,
        "normalization_stripped": stripped,
        "input_convention": "normalized" if normalized_input else "original",
        "expects": expects,
        "channel_order": "RGB",
    }


def _per_channel_const(c: np.ndarray) -> np.ndarray | None:
    """A scalar, (C,1,1) or (1,C,1,1) constant as float64 broadcastable to NCHW, else None."""
    c = np.asarray(c, dtype=np.float64)
    if c.size == 1:
        return c.reshape(())
    if c.ndim == 4 and c.shape[0] == 1:
        c = c[0]
    if c.ndim == 3 and c.shape[1:] == (1, 1):
        return c
    return None


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------


class _Batch:
    """Symbolic batch size inside folded ``Shape`` results."""

    def __repr__(self) -> str:
        return "N"


_BATCH = _Batch()

_RUNTIME_OPS = {
    "Conv", "BatchNormalization", "PRelu", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip",
    "Add", "Sub", "Mul", "Div", "Gemm", "MatMul", "Flatten", "Reshape", "GlobalAveragePool",
    "GlobalMaxPool", "AveragePool", "MaxPool", "Dropout", "Identity", "Transpose", "Concat", "Shape",
}
_FOLD_OPS = {
    "Constant", "Identity", "Cast", "Reshape", "Flatten", "Transpose", "Unsqueeze", "Squeeze",
    "Concat", "Gather", "Shape", "DequantizeLinear", "Add", "Sub", "Mul", "Div", "Neg", "Sqrt",
    "Dropout", "Slice",
}


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _node_label(node: Any) -> str:
    return f"{node.op_type} node '{node.name or node.output[0]}'"


def _dequantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int, block: int) -> np.ndarray:
    """numpy DequantizeLinear: per-tensor, per-axis, or blocked along ``axis`` (opset 21)."""
    xf = x.astype(np.float64)
    s = scale.astype(np.float64)
    z = np.zeros_like(s) if zp is None else zp.astype(np.float64)
    if z.shape != s.shape:
        raise ValueError(f"zero point shape {z.shape} != scale shape {s.shape}")
    if s.size == 1 and block == 0:
        y = (xf - z.reshape(())) * s.reshape(())
    elif block == 0:
        if s.ndim != 1 or s.size != x.shape[axis]:
            raise ValueError(f"per-axis scale of shape {s.shape} does not fit input {x.shape} on axis {axis}")
        bshape = [1] * x.ndim
        bshape[axis] = s.size
        y = (xf - z.reshape(bshape)) * s.reshape(bshape)
    else:
        expect = list(x.shape)
        expect[axis] = -(-x.shape[axis] // block)
        if list(s.shape) != expect:
            raise ValueError(f"blocked scale shape {s.shape} should be {tuple(expect)} "
                             f"(input {x.shape}, axis {axis}, block_size {block})")
        idx = np.arange(x.shape[axis]) // block
        y = (xf - np.take(z, idx, axis=axis)) * np.take(s, idx, axis=axis)
    return y.astype(scale.dtype if scale.dtype in (np.float16, np.float32) else np.float32)


def _np_reshape(x: np.ndarray, shape: np.ndarray, allowzero: int) -> np.ndarray:
    dims = [int(d) for d in shape]
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


class _OnnxConverter:
    def __init__(self, model: Any, source: str, normalized_input: bool) -> None:
        self.model = model
        self.g = model.graph
        self.source = source
        self.normalized_input = normalized_input
        self.b = _GraphBuilder()
        self.consts: dict[str, np.ndarray] = {}
        self.values: dict[str, fx.Node] = {}
        self.rank: dict[str, int | None] = {}
        self.consumers: dict[str, list[Any]] = {}
        self.linear_from_matmul: dict[str, nn.Linear] = {}
        self._static_shapes: dict[str, list[int | None]] | None = None
        self.outputs = [o.name for o in self.g.output]

    # -- helpers -------------------------------------------------------------------------------
    def err(self, msg: str, node: Any = None) -> EfquantError:
        return EfquantError(msg, source=self.source, field=_node_label(node) if node is not None else None)

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def const(self, node: Any, i: int, what: str) -> np.ndarray:
        name = node.input[i] if i < len(node.input) else ""
        if not name or name not in self.consts:
            raise self.err(f"{what} (input {i}) must be a constant", node)
        return self.consts[name]

    def opt_const(self, node: Any, i: int) -> np.ndarray | None:
        name = node.input[i] if i < len(node.input) else ""
        return self.consts.get(name) if name else None

    def val(self, name: str, node: Any) -> fx.Node:
        if name in self.values:
            return self.values[name]
        raise self.err(f"input '{name}' is not a runtime tensor here", node)

    def operand(self, name: str, node: Any) -> fx.Node | float:
        if name in self.consts:
            return self.b.constant(name, self.consts[name])
        return self.val(name, node)

    def set_out(self, node: Any, value: fx.Node, rank: int | None) -> None:
        self.values[node.output[0]] = value
        self.rank[node.output[0]] = rank
        for extra in node.output[1:]:
            if extra and (self.consumers.get(extra) or extra in self.outputs):
                raise self.err(f"output '{extra}' is used but only the first output is supported", node)

    def single_use(self, name: str) -> bool:
        return len(self.consumers.get(name, [])) == 1 and name not in self.outputs

    # -- top level -----------------------------------------------------------------------------
    def convert(self) -> fx.GraphModule:
        from onnx import numpy_helper

        for init in self.g.initializer:
            self.consts[init.name] = numpy_helper.to_array(init)
        if len(self.outputs) != 1:
            raise EfquantError(f"expected exactly one graph output, found {self.outputs}", source=self.source,
                               field="graph.output")
        live = self._live_nodes()
        for n in live:
            for name in n.input:
                if name:
                    self.consumers.setdefault(name, []).append(n)
        # Real inputs: not initializers and actually read (SFace also lists unused weight names).
        inputs = [i for i in self.g.input if i.name not in self.consts and i.name in self.consumers]
        if len(inputs) != 1:
            raise EfquantError(f"expected exactly one real graph input, found {[i.name for i in inputs]}",
                               source=self.source, field="graph.input")
        inp = inputs[0]
        dims = inp.type.tensor_type.shape.dim
        in_rank = len(dims) if inp.type.tensor_type.HasField("shape") else None
        self._check_supported(live)
        # Constant nodes have no inputs: evaluate them first so the prefix detection can see them.
        for n in live:
            if n.op_type == "Constant":
                self.consts[n.output[0]] = self._fold(n)

        x = self.b.placeholder(inp.name)
        self.values[inp.name] = x
        self.rank[inp.name] = in_rank
        chain, scale, offset, chain_out = self._input_affine(inp.name)
        skip: set[int] = set()
        if self.normalized_input and chain:
            a, b = _affine_to_normalized(scale, offset)
            self.values[chain_out] = _emit_affine(self.b, x, a, b)
            self.rank[chain_out] = in_rank
            skip = {id(n) for n in chain}

        for n in live:
            if id(n) in skip or n.op_type == "Constant":
                continue
            try:
                self._convert_node(n)
            except EfquantError:
                raise
            except Exception as exc:  # numpy/torch complaints about this node's data
                raise self.err(f"cannot convert ({type(exc).__name__}: {exc})", n) from None

        out = self.outputs[0]
        if out not in self.values:
            raise EfquantError("graph output is a constant, not a function of the input", source=self.source,
                               field=out)
        stripped = bool(self.normalized_input and chain)
        meta = _preprocessing_meta([n.op_type for n in chain], scale, offset, self.normalized_input, stripped)
        return _attach(self.b.finish(self.values[out]), input_name=inp.name, output_name=out,
                       meta_preprocessing=meta)

    def _live_nodes(self) -> list[Any]:
        producer = {o: n for n in self.g.node for o in n.output if o}
        keep: set[int] = set()
        stack = [producer[o] for o in self.outputs if o in producer]
        while stack:
            n = stack.pop()
            if id(n) in keep:
                continue
            keep.add(id(n))
            stack.extend(producer[i] for i in n.input if i in producer)
        return [n for n in self.g.node if id(n) in keep]

    def _check_supported(self, live: list[Any]) -> None:
        bad: dict[str, list[str]] = {}
        for n in live:
            op = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}"
            if op not in _RUNTIME_OPS and op not in _FOLD_OPS:
                bad.setdefault(op, []).append(n.name or n.output[0])
        if bad:
            parts = [f"{op} ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''})"
                     for op, names in bad.items()]
            raise EfquantError(f"unsupported ONNX op(s): {'; '.join(parts)}", source=self.source,
                               field="graph.node")

    def _input_affine(self, name: str) -> tuple[list[Any], np.ndarray, np.ndarray, str]:
        """The leading Sub/Add/Mul/Div-by-constant chain on the raw input, composed to one affine."""
        chain: list[Any] = []
        scale, offset = np.ones(()), np.zeros(())
        cur = name
        while self.single_use(cur):
            n = self.consumers[cur][0]
            if n.op_type not in ("Add", "Sub", "Mul", "Div") or len(n.input) != 2 or n.input[0] == n.input[1]:
                break
            first = n.input[0] == cur
            other = n.input[1] if first else n.input[0]
            c = _per_channel_const(self.consts[other]) if other in self.consts else None
            if c is None:
                break
            if n.op_type == "Add":
                offset = offset + c
            elif n.op_type == "Sub" and first:
                offset = offset - c
            elif n.op_type == "Sub":
                scale, offset = -scale, c - offset
            elif n.op_type == "Mul":
                scale, offset = scale * c, offset * c
            elif first and np.all(c != 0):  # Div by constant
                scale, offset = scale / c, offset / c
            else:
                break
            chain.append(n)
            cur = n.output[0]
        return chain, scale, offset, cur

    # -- constant folding ----------------------------------------------------------------------
    def _fold(self, n: Any) -> np.ndarray:
        # np.asarray: indexing an object array (symbolic shape) can return the bare element
        return np.asarray(self._fold_raw(n))

    def _fold_raw(self, n: Any) -> Any:
        from onnx import numpy_helper

        op, at = n.op_type, _attrs(n)
        ins = [self.consts[i] if i else None for i in n.input]
        if op == "Constant":
            if "value" in at:
                return numpy_helper.to_array(at["value"])
            for key in ("value_float", "value_int"):
                if key in at:
                    return np.array(at[key], dtype=np.float32 if key == "value_float" else np.int64)
            for key in ("value_floats", "value_ints"):
                if key in at:
                    return np.array(at[key], dtype=np.float32 if key == "value_floats" else np.int64)
            raise self.err("Constant without a supported value attribute", n)
        x = ins[0]
        if op in ("Identity", "Dropout"):
            return x
        if op == "Cast":
            if x.dtype == object:
                return x
            from onnx import helper

            return x.astype(helper.tensor_dtype_to_np_dtype(at["to"]))
        if op == "DequantizeLinear":
            axis = int(at.get("axis", 1))
            axis = axis + x.ndim if axis < 0 else axis
            zp = ins[2] if len(ins) > 2 else None
            return _dequantize(x, ins[1], zp, axis, int(at.get("block_size", 0)))
        if op == "Reshape":
            return _np_reshape(x, ins[1], int(at.get("allowzero", 0)))
        if op == "Flatten":
            axis = int(at.get("axis", 1))
            axis = axis + x.ndim if axis < 0 else axis
            return x.reshape(int(np.prod(x.shape[:axis])), -1)
        if op == "Transpose":
            return np.transpose(x, at.get("perm"))
        if op in ("Unsqueeze", "Squeeze"):
            axes = at.get("axes")
            if axes is None and len(ins) > 1 and ins[1] is not None:
                axes = [int(a) for a in ins[1]]
            if op == "Squeeze":
                return np.squeeze(x, axis=None if axes is None else tuple(axes))
            out = x
            nd = x.ndim + len(axes)
            for a in sorted(a + nd if a < 0 else a for a in axes):
                out = np.expand_dims(out, a)
            return out
        if op == "Concat":
            return np.concatenate([np.atleast_1d(i) for i in ins], axis=int(at["axis"]))
        if op == "Gather":
            return np.take(x, ins[1], axis=int(at.get("axis", 0)))
        if op == "Slice":
            starts, ends = ins[1], ins[2]
            axes = ins[3] if len(ins) > 3 and ins[3] is not None else range(len(starts))
            steps = ins[4] if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
            sl = [slice(None)] * x.ndim
            for s, e, a, st in zip(starts, ends, axes, steps, strict=False):
                sl[int(a)] = slice(int(s), int(e), int(st))
            return x[tuple(sl)]
        if op == "Shape":
            return np.array(x.shape, dtype=np.int64)[at.get("start", 0):at.get("end")]
        if op == "Neg":
            return -x
        if op == "Sqrt":
            return np.sqrt(x)
        fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op]
        if op == "Div" and np.issubdtype(x.dtype, np.integer):
            return (x // ins[1]).astype(x.dtype)
        return fn(x, ins[1]).astype(x.dtype)

    # -- runtime nodes -------------------------------------------------------------------------
    def _convert_node(self, n: Any) -> None:
        op = n.op_type
        data_ins = [i for i in n.input if i]
        if op in _FOLD_OPS and data_ins and all(self.is_const(i) for i in data_ins):
            self.consts[n.output[0]] = self._fold(n)
            return
        if op == "Shape":
            self.consts[n.output[0]] = self._symbolic_shape(n)
            return
        if op not in _RUNTIME_OPS:
            raise self.err("only supported on constant inputs (it would need a runtime tensor here)", n)
        getattr(self, f"_op_{op}")(n, _attrs(n))

    def _x(self, n: Any) -> tuple[fx.Node, int | None]:
        name = n.input[0]
        return self.val(name, n), self.rank.get(name)

    def _op_Conv(self, n: Any, at: dict[str, Any]) -> None:
        x, _ = self._x(n)
        w = self.const(n, 1, "Conv weight")
        bias = self.opt_const(n, 2)
        if w.ndim != 4:
            raise self.err(f"only 2-D convolutions are supported (weight shape {w.shape})", n)
        group = int(at.get("group", 1))
        kernel = tuple(int(k) for k in at.get("kernel_shape", w.shape[2:]))
        if kernel != tuple(w.shape[2:]):
            raise self.err(f"kernel_shape {kernel} does not match weight shape {w.shape}", n)
        strides = tuple(int(s) for s in at.get("strides", (1, 1)))
        dil = tuple(int(d) for d in at.get("dilations", (1, 1)))
        pads = [int(p) for p in at.get("pads", (0, 0, 0, 0))]
        auto_pad = at.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            eff = [(k - 1) * d for k, d in zip(kernel, dil, strict=True)]
            if strides != (1, 1) or any(e % 2 for e in eff):
                raise self.err(f"auto_pad={auto_pad} is only supported with stride 1 and odd kernels", n)
            pads = [eff[0] // 2, eff[1] // 2, eff[0] // 2, eff[1] // 2]
        elif auto_pad == "VALID":
            pads = [0, 0, 0, 0]
        if pads[:2] != pads[2:]:
            x = self.b.module(n.name + "_pad", nn.ZeroPad2d((pads[1], pads[3], pads[0], pads[2])), x)
            pads = [0, 0, 0, 0]
        conv = nn.Conv2d(w.shape[1] * group, w.shape[0], kernel, stride=strides, padding=(pads[0], pads[1]),
                         dilation=dil, groups=group, bias=bias is not None)
        with torch.no_grad():
            conv.weight.copy_(_tensor(w))
            if bias is not None:
                conv.bias.copy_(_tensor(bias.reshape(-1)))
        self.set_out(n, self.b.module(n.name or n.output[0], conv, x), 4)

    def _op_BatchNormalization(self, n: Any, at: dict[str, Any]) -> None:
        x, rank = self._x(n)
        if int(at.get("training_mode", 0)):
            raise self.err("training_mode=1 is not supported", n)
        params = [self.const(n, i, what) for i, what in enumerate(["", "scale", "bias", "mean", "var"]) if i]
        bn = _batchnorm(rank, *params, eps=float(at.get("epsilon", 1e-5)),
                        momentum=1.0 - float(at.get("momentum", 0.9)), where=_node_label(n),
                        source=self.source)
        self.set_out(n, self.b.module(n.name or n.output[0], bn, x), rank)

    def _op_PRelu(self, n: Any, at: dict[str, Any]) -> None:
        x, rank = self._x(n)
        mod = _prelu(self.const(n, 1, "PRelu slope"), rank, where=_node_label(n), source=self.source)
        self.set_out(n, self.b.module(n.name or n.output[0], mod, x), rank)

    def _simple(self, n: Any, mod: nn.Module) -> None:
        x, rank = self._x(n)
        self.set_out(n, self.b.module(n.name or n.output[0], mod, x), rank)

    def _op_Relu(self, n: Any, at: dict[str, Any]) -> None:
        self._simple(n, nn.ReLU())

    def _op_LeakyRelu(self, n: Any, at: dict[str, Any]) -> None:
        self._simple(n, nn.LeakyReLU(float(at.get("alpha", 0.01))))

    def _op_Sigmoid(self, n: Any, at: dict[str, Any]) -> None:
        self._simple(n, nn.Sigmoid())

    def _op_Tanh(self, n: Any, at: dict[str, Any]) -> None:
        self._simple(n, nn.Tanh())

    def _op_Clip(self, n: Any, at: dict[str, Any]) -> None:
        lo = self.opt_const(n, 1)
        hi = self.opt_const(n, 2)
        lo_v = float(lo) if lo is not None else float(at.get("min", -np.inf))
        hi_v = float(hi) if hi is not None else float(at.get("max", np.inf))
        if lo_v == 0.0 and hi_v == np.inf:
            self._simple(n, nn.ReLU())
        else:
            self._simple(n, nn.Hardtanh(lo_v, hi_v))

    def _binary(self, n: Any, fn: Callable[[Any, Any], Any]) -> None:
        a, b = n.input[0], n.input[1]
        ranks = [self.rank.get(i, np.ndim(self.consts[i]) if i in self.consts else None) for i in (a, b)]
        rank = None if None in ranks else max(ranks)  # type: ignore[type-var]
        self.set_out(n, self.b.function(fn, self.operand(a, n), self.operand(b, n)), rank)

    def _op_Add(self, n: Any, at: dict[str, Any]) -> None:
        # MatMul + constant bias -> fill the bias of the Linear made for the MatMul.
        for mm, other in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
            lin = self.linear_from_matmul.get(mm)
            if lin is not None and lin.bias is None and other in self.consts and self.single_use(mm):
                c = self.consts[other]
                if c.ndim >= 1 and c.size == lin.out_features == c.shape[-1]:
                    lin.bias = nn.Parameter(_tensor(c.reshape(-1)))
                    self.set_out(n, self.values[mm], self.rank.get(mm))
                    return
        self._binary(n, operator.add)

    def _op_Sub(self, n: Any, at: dict[str, Any]) -> None:
        self._binary(n, operator.sub)

    def _op_Mul(self, n: Any, at: dict[str, Any]) -> None:
        self._binary(n, operator.mul)

    def _op_Div(self, n: Any, at: dict[str, Any]) -> None:
        self._binary(n, operator.truediv)

    @staticmethod
    def _linear(weight: np.ndarray, bias: np.ndarray | None) -> nn.Linear:
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            lin.weight.copy_(_tensor(weight))
            if bias is not None:
                lin.bias.copy_(_tensor(np.broadcast_to(bias.reshape(-1), (weight.shape[0],))))
        return lin

    def _op_Gemm(self, n: Any, at: dict[str, Any]) -> None:
        x, _ = self._x(n)
        alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
        if int(at.get("transA", 0)):
            raise self.err("transA=1 is not supported", n)
        w = self.const(n, 1, "Gemm weight B")
        w = w if int(at.get("transB", 0)) else w.T  # -> (out, in)
        c = self.opt_const(n, 2)
        if len(n.input) > 2 and n.input[2] and c is None:
            raise self.err("Gemm bias C must be a constant", n)
        if c is not None and c.size not in (1, w.shape[0]):
            raise self.err(f"Gemm bias of shape {c.shape} does not broadcast to ({w.shape[0]},)", n)
        lin = self._linear(alpha * w.astype(np.float64), None if c is None else beta * c.astype(np.float64))
        self.set_out(n, self.b.module(n.name or n.output[0], lin, x), 2)

    def _op_MatMul(self, n: Any, at: dict[str, Any]) -> None:
        a, b = n.input[0], n.input[1]
        if b in self.consts and self.consts[b].ndim == 2 and a in self.values:
            lin = self._linear(self.consts[b].T, None)
            self.linear_from_matmul[n.output[0]] = lin
            self.set_out(n, self.b.module(n.name or n.output[0], lin, self.values[a]), self.rank.get(a))
            return
        self._binary(n, torch.matmul)

    def _op_Flatten(self, n: Any, at: dict[str, Any]) -> None:
        x, rank = self._x(n)
        axis = int(at.get("axis", 1))
        if axis < 0:
            if rank is None:
                raise self.err("negative axis needs a known input rank", n)
            axis += rank
        if axis == 1:
            out = self.b.module(n.name or n.output[0], nn.Flatten(1), x)
        elif axis == 0:
            out = self.b.method("reshape", x, 1, -1)
        else:
            out = self.b.function(torch.flatten, self.b.function(torch.flatten, x, 0, axis - 1), 1)
        self.set_out(n, out, 2)

    def _op_Reshape(self, n: Any, at: dict[str, Any]) -> None:
        x, _ = self._x(n)
        target = list(self.const(n, 1, "Reshape shape").reshape(-1))
        allowzero = int(at.get("allowzero", 0))
        dims: list[Any] = []
        for i, d in enumerate(target):
            if d is _BATCH:
                dims.append(_BATCH)
            elif int(d) == 0 and not allowzero:
                dims.append(_BATCH if i == 0 else self.b.method("size", x, i))
            elif i == 0 and int(d) == 1:
                dims.append(_BATCH)  # the file fixed the batch to 1: keep it dynamic
            else:
                dims.append(int(d))
        if dims and dims[0] is _BATCH:
            rest = dims[1:]
            if rest == [-1]:
                out = self.b.function(torch.flatten, x, 1)
            elif -1 not in rest:
                out = self.b.method("reshape", x, -1, *rest)
            else:
                out = self.b.method("reshape", x, self.b.method("size", x, 0), *rest)
        elif any(d is _BATCH for d in dims):
            raise self.err("the batch dimension may only appear first in the target shape", n)
        else:
            out = self.b.method("reshape", x, *dims)
        self.set_out(n, out, len(dims))

    def _op_GlobalAveragePool(self, n: Any, at: dict[str, Any]) -> None:
        self._pool_rank_check(n)
        self._simple(n, nn.AdaptiveAvgPool2d(1))

    def _op_GlobalMaxPool(self, n: Any, at: dict[str, Any]) -> None:
        self._pool_rank_check(n)
        self._simple(n, nn.AdaptiveMaxPool2d(1))

    def _pool_rank_check(self, n: Any) -> None:
        rank = self.rank.get(n.input[0])
        if rank not in (4, None):
            raise self.err(f"only 2-D pooling is supported (input rank {rank})", n)

    def _pool_args(self, n: Any, at: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
        self._pool_rank_check(n)
        kernel = tuple(int(k) for k in at["kernel_shape"])
        if len(kernel) != 2:
            raise self.err(f"only 2-D pooling is supported (kernel {kernel})", n)
        strides = tuple(int(s) for s in at.get("strides", (1, 1)))
        pads = [int(p) for p in at.get("pads", (0, 0, 0, 0))]
        auto_pad = at.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad not in ("NOTSET", "VALID"):
            raise self.err(f"auto_pad={auto_pad} is not supported for pooling", n)
        if auto_pad == "VALID":
            pads = [0, 0, 0, 0]
        if pads[:2] != pads[2:]:
            raise self.err(f"asymmetric pooling pads {pads} are not supported", n)
        return kernel, strides, (pads[0], pads[1])

    def _op_AveragePool(self, n: Any, at: dict[str, Any]) -> None:
        kernel, strides, pads = self._pool_args(n, at)
        self._simple(n, nn.AvgPool2d(kernel, strides, pads, ceil_mode=bool(at.get("ceil_mode", 0)),
                                     count_include_pad=bool(at.get("count_include_pad", 0))))

    def _op_MaxPool(self, n: Any, at: dict[str, Any]) -> None:
        kernel, strides, pads = self._pool_args(n, at)
        dil = tuple(int(d) for d in at.get("dilations", (1, 1)))
        ceil = bool(at.get("ceil_mode", 0))
        self._simple(n, nn.MaxPool2d(kernel, strides, pads, dilation=dil, ceil_mode=ceil))

    def _op_Dropout(self, n: Any, at: dict[str, Any]) -> None:
        x, rank = self._x(n)
        self.set_out(n, x, rank)  # inference: identity

    def _op_Identity(self, n: Any, at: dict[str, Any]) -> None:
        x, rank = self._x(n)
        self.set_out(n, x, rank)

    def _op_Transpose(self, n: Any, at: dict[str, Any]) -> None:
        x, rank = self._x(n)
        perm = at.get("perm")
        if perm is None:
            if rank is None:
                raise self.err("Transpose without perm needs a known input rank", n)
            perm = list(range(rank))[::-1]
        if perm[0] != 0:
            raise self.err(f"a transpose that moves the batch dim (perm {list(perm)}) is not supported", n)
        self.set_out(n, self.b.method("permute", x, *[int(p) for p in perm]), len(perm))

    def _op_Concat(self, n: Any, at: dict[str, Any]) -> None:
        parts = [self.operand(i, n) for i in n.input if i]
        rank = self.rank.get(n.input[0])
        self.set_out(n, self.b.function(torch.cat, parts, int(at["axis"])), rank)

    def _symbolic_shape(self, n: Any) -> np.ndarray:
        """``Shape`` of a runtime tensor from static inference, with the batch kept symbolic."""
        if self._static_shapes is None:
            self._static_shapes = self._infer_shapes()
        dims = self._static_shapes.get(n.input[0])
        if dims is None or any(d is None for d in dims[1:]):
            raise self.err(f"static shape of '{n.input[0]}' is unknown (found {dims})", n)
        at = _attrs(n)
        full = np.array([_BATCH, *dims[1:]], dtype=object)
        return full[at.get("start", 0):at.get("end")]

    def _infer_shapes(self) -> dict[str, list[int | None]]:
        import onnx

        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        for i in m.graph.input:
            if i.name not in self.consts and i.type.tensor_type.shape.dim:
                i.type.tensor_type.shape.dim[0].dim_value = 1
        try:
            m = onnx.shape_inference.infer_shapes(m)
        except Exception as exc:
            raise EfquantError(f"shape inference failed ({exc})", source=self.source, field="Shape") from None
        out: dict[str, list[int | None]] = {}
        for vi in [*m.graph.input, *m.graph.value_info, *m.graph.output]:
            t = vi.type.tensor_type
            if t.HasField("shape"):
                out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        return out


def load_onnx_model(path: str | Path, *, normalized_input: bool = True) -> fx.GraphModule:
    """Convert an ONNX face recognizer to a torch FX GraphModule of standard modules (eval mode).

    ``normalized_input=True`` (default): the module takes RGB ``(x - 127.5) / 127.5`` whatever the
    graph's own preprocessing (see the module docstring); ``False`` keeps the graph's convention.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise EfquantError("ONNX file not found", source=str(path))
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise EfquantError(f"cannot read ONNX file ({type(exc).__name__}: {exc})", source=str(path)) from None
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or ["invalid model"])[0]
        raise EfquantError(f"onnx.checker rejected the model: {first}", source=str(path),
                           field="check_model") from None
    return _OnnxConverter(model, str(path), normalized_input).convert()

