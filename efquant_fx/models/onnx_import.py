"""Convert an ONNX face recognizer into a ``torch.fx.GraphModule`` of standard torch modules.

Why our own converter: onnx2torch needs torchvision, which does not install beside our CPU torch
build, and the quantizer wants *real* modules (``nn.Conv2d``, ``nn.Linear``, ``nn.PReLU``,
``nn.BatchNorm*``) and ``operator.add`` residuals, not opaque wrappers.

* ``onnx.checker.check_model`` runs first; graph inputs that are initializers (SFace lists its
  weights as inputs) are dropped, leaving exactly one real input.
* Constant subgraphs are folded with numpy (``_FOLD``), including ``DequantizeLinear`` per-tensor,
  per-axis and opset-21 ``block_size``, so int8-block weights become float tensors.
* Runtime nodes dispatch to ``_op_<OpType>`` methods; MatMul + constant Add becomes one ``nn.Linear``.
* The batch dim stays dynamic: the files fix it to 1, our batches are larger. A Reshape target that
  starts with the batch (literal 1, 0 or a ``Shape`` of the batch) becomes ``-1``/``x.size(0)``;
  ``Shape`` of a runtime tensor is folded from static shape inference with the batch symbolic.
* Input convention (:mod:`efquant_fx.models.import_common`): with ``normalized_input=True`` a
  leading Sub/Add/Mul/Div-by-constant chain on the raw pixels (SFace's ``(x - 127.5) * (1/128)``)
  is replaced by the equivalent affine on our ``(x - 127.5) / 127.5`` input; a graph without one
  is assumed to take that input already (insightface's exported packs do).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from efquant_fx.errors import EfquantError
from efquant_fx.models.import_common import (
    STANDARD_INPUT,
    GraphBuilder,
    affine_step,
    batchnorm_module,
    conv2d_module,
    converting,
    emit_normalized_input,
    float_tensor,
    linear_module,
    prelu_module,
    preprocessing_meta,
    unsupported_ops_error,
)

__all__ = ["STANDARD_INPUT", "load_onnx_model"]


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
# (op, constant is the second operand) -> affine_step kind, for the input-normalisation chain
_CHAIN_STEP = {("Add", True): "add", ("Add", False): "add", ("Sub", True): "sub", ("Sub", False): "rsub",
               ("Mul", True): "mul", ("Mul", False): "mul", ("Div", True): "div"}


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


# -- constant folding: op -> fn(x, inputs, attributes), x being inputs[0] ------------------------------


def _fold_cast(x: np.ndarray, ins: list[Any], at: dict[str, Any]) -> np.ndarray:
    if x.dtype == object:  # a symbolic shape stays as it is
        return x
    from onnx import helper

    return x.astype(helper.tensor_dtype_to_np_dtype(at["to"]))


def _fold_dequantize(x: np.ndarray, ins: list[Any], at: dict[str, Any]) -> np.ndarray:
    axis = int(at.get("axis", 1))
    axis = axis + x.ndim if axis < 0 else axis
    zp = ins[2] if len(ins) > 2 else None
    return _dequantize(x, ins[1], zp, axis, int(at.get("block_size", 0)))


def _fold_flatten(x: np.ndarray, ins: list[Any], at: dict[str, Any]) -> np.ndarray:
    axis = int(at.get("axis", 1))
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _fold_axes(ins: list[Any], at: dict[str, Any]) -> list[int] | None:
    """Squeeze/Unsqueeze axes: an attribute before opset 13, the second input after."""
    axes = at.get("axes")
    if axes is None and len(ins) > 1 and ins[1] is not None:
        axes = [int(a) for a in ins[1]]
    return axes


def _fold_squeeze(x: np.ndarray, ins: list[Any], at: dict[str, Any]) -> np.ndarray:
    axes = _fold_axes(ins, at)
    return np.squeeze(x, axis=None if axes is None else tuple(axes))


def _fold_unsqueeze(x: np.ndarray, ins: list[Any], at: dict[str, Any]) -> np.ndarray:
    axes = _fold_axes(ins, at)
    out = x
    nd = x.ndim + len(axes)
    for a in sorted(a + nd if a < 0 else a for a in axes):
        out = np.expand_dims(out, a)
    return out


def _fold_slice(x: np.ndarray, ins: list[Any], at: dict[str, Any]) -> np.ndarray:
    starts, ends = ins[1], ins[2]
    axes = ins[3] if len(ins) > 3 and ins[3] is not None else range(len(starts))
    steps = ins[4] if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    sl = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps, strict=False):
        sl[int(a)] = slice(int(s), int(e), int(st))
    return x[tuple(sl)]


def _fold_arith(fn: Callable[[Any, Any], Any]) -> Callable[[np.ndarray, list[Any], dict[str, Any]], np.ndarray]:
    """Elementwise op that keeps the first operand's dtype; integer Div floors (shape arithmetic)."""

    def fold(x: np.ndarray, ins: list[Any], at: dict[str, Any]) -> np.ndarray:
        if fn is np.divide and np.issubdtype(x.dtype, np.integer):
            return (x // ins[1]).astype(x.dtype)
        return fn(x, ins[1]).astype(x.dtype)

    return fold


_FOLD: dict[str, Callable[[Any, list[Any], dict[str, Any]], Any]] = {
    "Identity": lambda x, ins, at: x,
    "Dropout": lambda x, ins, at: x,
    "Cast": _fold_cast,
    "DequantizeLinear": _fold_dequantize,
    "Reshape": lambda x, ins, at: _np_reshape(x, ins[1], int(at.get("allowzero", 0))),
    "Flatten": _fold_flatten,
    "Transpose": lambda x, ins, at: np.transpose(x, at.get("perm")),
    "Unsqueeze": _fold_unsqueeze,
    "Squeeze": _fold_squeeze,
    "Concat": lambda x, ins, at: np.concatenate([np.atleast_1d(i) for i in ins], axis=int(at["axis"])),
    "Gather": lambda x, ins, at: np.take(x, ins[1], axis=int(at.get("axis", 0))),
    "Slice": _fold_slice,
    "Shape": lambda x, ins, at: np.array(x.shape, dtype=np.int64)[at.get("start", 0):at.get("end")],
    "Neg": lambda x, ins, at: -x,
    "Sqrt": lambda x, ins, at: np.sqrt(x),
    "Add": _fold_arith(np.add),
    "Sub": _fold_arith(np.subtract),
    "Mul": _fold_arith(np.multiply),
    "Div": _fold_arith(np.divide),
}
_FOLD_OPS = {"Constant", *_FOLD}


class _OnnxConverter:
    def __init__(self, model: Any, source: str, normalized_input: bool) -> None:
        self.model = model
        self.g = model.graph
        self.source = source
        self.normalized_input = normalized_input
        self.b = GraphBuilder()
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
            self.values[chain_out] = emit_normalized_input(self.b, x, scale, offset)
            self.rank[chain_out] = in_rank
            skip = {id(n) for n in chain}

        for n in live:
            if id(n) in skip or n.op_type == "Constant":
                continue
            with converting(lambda msg, n=n: self.err(msg, n)):
                self._convert_node(n)

        out = self.outputs[0]
        if out not in self.values:
            raise EfquantError("graph output is a constant, not a function of the input", source=self.source,
                               field=out)
        stripped = bool(self.normalized_input and chain)
        meta = preprocessing_meta([n.op_type for n in chain], scale, offset, self.normalized_input, stripped)
        return self.b.finish(self.values[out], input_name=inp.name, output_name=out, meta_preprocessing=meta)

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
            raise unsupported_ops_error("ONNX", bad, source=self.source, field="graph.node")

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
            step = affine_step(scale, offset, _CHAIN_STEP.get((n.op_type, first), ""), c)
            if step is None:
                break
            scale, offset = step
            chain.append(n)
            cur = n.output[0]
        return chain, scale, offset, cur

    # -- constant folding ----------------------------------------------------------------------
    def _fold(self, n: Any) -> np.ndarray:
        # np.asarray: indexing an object array (symbolic shape) can return the bare element
        return np.asarray(self._fold_raw(n))

    def _fold_raw(self, n: Any) -> Any:
        at = _attrs(n)
        if n.op_type == "Constant":
            return self._fold_constant(n, at)
        ins = [self.consts[i] if i else None for i in n.input]
        return _FOLD[n.op_type](ins[0], ins, at)

    def _fold_constant(self, n: Any, at: dict[str, Any]) -> np.ndarray:
        from onnx import numpy_helper

        if "value" in at:
            return numpy_helper.to_array(at["value"])
        for key in ("value_float", "value_int"):
            if key in at:
                return np.array(at[key], dtype=np.float32 if key == "value_float" else np.int64)
        for key in ("value_floats", "value_ints"):
            if key in at:
                return np.array(at[key], dtype=np.float32 if key == "value_floats" else np.int64)
        raise self.err("Constant without a supported value attribute", n)

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
        conv = conv2d_module(w, bias, stride=strides, padding=(pads[0], pads[1]), dilation=dil, groups=group)
        self.set_out(n, self.b.module(n.name or n.output[0], conv, x), 4)

    def _op_BatchNormalization(self, n: Any, at: dict[str, Any]) -> None:
        x, rank = self._x(n)
        if int(at.get("training_mode", 0)):
            raise self.err("training_mode=1 is not supported", n)
        params = [self.const(n, i, what) for i, what in enumerate(["", "scale", "bias", "mean", "var"]) if i]
        bn = batchnorm_module(rank, *params, eps=float(at.get("epsilon", 1e-5)),
                              momentum=1.0 - float(at.get("momentum", 0.9)), where=_node_label(n),
                              source=self.source)
        self.set_out(n, self.b.module(n.name or n.output[0], bn, x), rank)

    def _op_PRelu(self, n: Any, at: dict[str, Any]) -> None:
        x, rank = self._x(n)
        mod = prelu_module(self.const(n, 1, "PRelu slope"), rank, where=_node_label(n), source=self.source)
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
                    lin.bias = nn.Parameter(float_tensor(c.reshape(-1)))
                    self.set_out(n, self.values[mm], self.rank.get(mm))
                    return
        self._binary(n, operator.add)

    def _op_Sub(self, n: Any, at: dict[str, Any]) -> None:
        self._binary(n, operator.sub)

    def _op_Mul(self, n: Any, at: dict[str, Any]) -> None:
        self._binary(n, operator.mul)

    def _op_Div(self, n: Any, at: dict[str, Any]) -> None:
        self._binary(n, operator.truediv)

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
        lin = linear_module(alpha * w.astype(np.float64), None if c is None else beta * c.astype(np.float64))
        self.set_out(n, self.b.module(n.name or n.output[0], lin, x), 2)

    def _op_MatMul(self, n: Any, at: dict[str, Any]) -> None:
        a, b = n.input[0], n.input[1]
        if b in self.consts and self.consts[b].ndim == 2 and a in self.values:
            lin = linear_module(self.consts[b].T, None)
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

