"""Convert an MXNet checkpoint (``*-symbol.json`` + ``*.params``) to a ``torch.fx.GraphModule``.

No MXNet needed: the symbol JSON is a plain node list and the ``.params`` file is parsed here.
The result is made of standard modules (``nn.Conv2d``, ``nn.BatchNorm2d/1d``, ``nn.PReLU``,
``nn.Linear``...) and ``operator.add`` residuals, so it quantizes like any other backbone.

``.params`` byte layout (little endian; what ``mx.nd.save`` / ``save_checkpoint`` writes)
----------------------------------------------------------------------------------------
::

    uint64  0x112                      list magic (kMXAPINDArrayListMagic)
    uint64  0                          reserved
    uint64  N                          number of arrays, then N times an NDArray:
        uint32 magic                   0xF993FAC9 (V2) or 0xF993FACA (V3): followed by
                                         int32 storage type (0 = dense; sparse is refused)
                                       0xF993FAC8 (V1): no storage type
                                       anything else (legacy): this word is already ndim
        uint32 ndim                    (int32 in V3; -1 there means "no array")
        ndim x int64 dims              (uint32 dims in the legacy layout)
        -- if ndim == 0 (V1/V2/legacy) the array is empty and nothing else follows --
        int32 dev_type, int32 dev_id   context the array was saved from (ignored)
        int32 type_flag                0 f32, 1 f64, 2 f16, 3 u8, 4 i32, 5 i8, 6 i64, 7 bool,
                                       8 i16, 9 u16, 10 u32, 11 u64, 12 bf16
        prod(dims) * itemsize bytes    the data, C order
    uint64  M                          number of names (M == N), then M times:
        uint64 length, bytes           UTF-8 name, "arg:<param>" or "aux:<state>"

Any truncation, bad magic, odd dtype or count mismatch raises :class:`EfquantError`.

Input convention (:mod:`efquant_fx.models.import_common`): with ``normalized_input=True``
insightface's leading ``_minus_scalar 127.5`` / ``_mul_scalar 0.0078125`` on raw pixels is replaced
by the equivalent affine on our ``(x - 127.5) / 127.5`` input. Ops dispatch through ``_HANDLERS``,
one short function per op.
"""

from __future__ import annotations

import json
import operator
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from efquant_fx.errors import EfquantError
from efquant_fx.models.import_common import (
    GraphBuilder,
    affine_step,
    batchnorm_module,
    conv2d_module,
    converting,
    emit_normalized_input,
    linear_module,
    prelu_module,
    preprocessing_meta,
    unsupported_ops_error,
)

__all__ = ["load_mxnet_model", "read_mxnet_params"]

_LIST_MAGIC = 0x112
_V1, _V2, _V3 = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
_DTYPES: dict[int, Any] = {
    0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32, 5: np.int8, 6: np.int64,
    7: np.bool_, 8: np.int16, 9: np.uint16, 10: np.uint32, 11: np.uint64, 12: "bfloat16",
}
_MAX_NDIM = 32


class _Reader:
    """Bounds-checked little-endian reader: every short read becomes an EfquantError."""

    def __init__(self, data: bytes, source: str) -> None:
        self.data, self.pos, self.source = data, 0, source

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise EfquantError(f"truncated file: needed {n} bytes for {what} at offset {self.pos}, "
                               f"file has {len(self.data)}", source=self.source, field=what)
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> Any:
        vals = struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))
        return vals[0] if len(vals) == 1 else vals


def _read_array(r: _Reader, idx: int) -> np.ndarray | None:
    where = f"array[{idx}]"
    magic = r.unpack("I", f"{where}.magic")
    legacy = magic not in (_V1, _V2, _V3)
    if magic in (_V2, _V3):
        stype = r.unpack("i", f"{where}.storage_type")
        if stype != 0:
            raise EfquantError(f"storage type {stype} (sparse) is not supported", source=r.source,
                               field=where)
    if legacy:
        ndim = magic
    else:
        ndim = r.unpack("i" if magic == _V3 else "I", f"{where}.ndim")
    if magic == _V3 and ndim == -1:
        return None
    if ndim < 0 or ndim > _MAX_NDIM:
        raise EfquantError(f"implausible ndim {ndim} (bad magic 0x{magic:08X}?)", source=r.source,
                           field=where)
    dims = r.unpack(("I" if legacy else "q") * ndim, f"{where}.shape") if ndim else ()
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if ndim == 0 and magic != _V3:
        return None
    if any(d < 0 for d in dims):
        raise EfquantError(f"negative dimension in shape {dims}", source=r.source, field=where)
    r.unpack("ii", f"{where}.context")
    flag = r.unpack("i", f"{where}.dtype")
    if flag not in _DTYPES:
        raise EfquantError(f"unknown dtype flag {flag}", source=r.source, field=where)
    count = int(np.prod(dims, dtype=np.int64)) if dims else 1
    if _DTYPES[flag] == "bfloat16":
        raw = np.frombuffer(r.take(2 * count, f"{where}.data"), dtype="<u2").astype(np.uint32) << 16
        return raw.view(np.float32).reshape(dims)
    dt = np.dtype(_DTYPES[flag]).newbyteorder("<")
    return np.frombuffer(r.take(dt.itemsize * count, f"{where}.data"), dtype=dt).reshape(dims).copy()


def read_mxnet_params(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Read an MXNet ``.params`` file into ``(arg_params, aux_params)`` without MXNet.

    Names without an ``arg:``/``aux:`` prefix (plain ``nd.save`` of a dict) count as args.
    """
    path = Path(path)
    if not path.is_file():
        raise EfquantError("params file not found", source=str(path))
    r = _Reader(path.read_bytes(), str(path))
    header, _reserved = r.unpack("QQ", "header")
    if header != _LIST_MAGIC:
        raise EfquantError(f"not an MXNet NDArray list (magic 0x{header:X}, expected 0x112)",
                           source=str(path), field="header")
    n = r.unpack("Q", "array_count")
    if n > len(r.data) // 8:
        raise EfquantError(f"implausible array count {n}", source=str(path), field="array_count")
    arrays = [_read_array(r, i) for i in range(n)]
    m = r.unpack("Q", "name_count")
    if m != n:
        raise EfquantError(f"{n} arrays but {m} names", source=str(path), field="name_count")
    names = []
    for i in range(m):
        length = r.unpack("Q", f"name[{i}].length")
        raw = r.take(length, f"name[{i}]")
        try:
            names.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise EfquantError("name is not UTF-8", source=str(path), field=f"name[{i}]") from None
    if r.pos != len(r.data):
        raise EfquantError(f"{len(r.data) - r.pos} unexpected trailing bytes", source=str(path), field="end")
    args: dict[str, np.ndarray] = {}
    aux: dict[str, np.ndarray] = {}
    for name, arr in zip(names, arrays, strict=True):
        if arr is None:
            continue
        kind, _, bare = name.partition(":")
        if not bare:
            args[name] = arr
        elif kind == "arg":
            args[bare] = arr
        elif kind == "aux":
            aux[bare] = arr
        else:
            raise EfquantError(f"name '{name}' has prefix '{kind}:', expected 'arg:' or 'aux:'",
                               source=str(path), field="names")
    return args, aux


# --------------------------------------------------------------------------------------------
# Symbol -> FX
# --------------------------------------------------------------------------------------------


def _tuple(v: Any, default: tuple[int, ...]) -> tuple[int, ...]:
    if v is None:
        return default
    s = str(v).strip().strip("()[]")
    return tuple(int(p) for p in s.replace(" ", "").split(",") if p) if s else default


def _bool(v: Any, default: bool) -> bool:
    return default if v is None else str(v).strip().lower() in ("true", "1")


# _*_scalar op -> affine_step kind, for the input-normalisation chain
_SCALAR_STEP = {"_minus_scalar": "sub", "_plus_scalar": "add", "_mul_scalar": "mul", "_div_scalar": "div",
                "_rminus_scalar": "rsub"}
_IDENTITY_OPS = ("Dropout", "BlockGrad", "_copy", "identity", "stop_gradient", "Cast")
_BINARY_OPS = {
    **dict.fromkeys(("elemwise_add", "_plus", "_Plus", "broadcast_add", "_add"), operator.add),
    "elemwise_sub": operator.sub, "broadcast_sub": operator.sub,
    "elemwise_mul": operator.mul, "broadcast_mul": operator.mul,
}


class _MxConverter:
    def __init__(self, symbol: dict[str, Any], args: dict[str, np.ndarray], aux: dict[str, np.ndarray],
                 sym_path: str, params_path: str, normalized_input: bool) -> None:
        self.nodes = symbol["nodes"]
        self.heads = symbol["heads"]
        self.params = {**args, **aux}
        self.sym_path, self.params_path = sym_path, params_path
        self.normalized_input = normalized_input
        self.b = GraphBuilder()
        self.values: dict[int, fx.Node] = {}
        self.rank: dict[int, int | None] = {}
        self.consumers: dict[int, list[int]] = {}

    # -- helpers -------------------------------------------------------------------------------
    def name(self, idx: int) -> str:
        return self.nodes[idx]["name"]

    def label(self, idx: int) -> str:
        return f"{self.nodes[idx]['op']} node '{self.name(idx)}'"

    def err(self, msg: str, idx: int) -> EfquantError:
        return EfquantError(msg, source=self.sym_path, field=self.label(idx))

    @staticmethod
    def attrs(node: dict[str, Any]) -> dict[str, Any]:
        return {**node.get("param", {}), **node.get("attr", {}), **node.get("attrs", {})}

    def param(self, idx: int, pos: int, what: str) -> np.ndarray:
        ins = self.nodes[idx]["inputs"]
        if pos >= len(ins):
            raise self.err(f"missing input {pos} ({what})", idx)
        src = self.nodes[ins[pos][0]]
        if src["op"] != "null" or src["name"] not in self.params:
            raise self.err(f"{what} '{src['name']}' is not in {self.params_path}", idx)
        return self.params[src["name"]]

    def data(self, idx: int, pos: int = 0) -> tuple[fx.Node, int | None]:
        src, out, *_ = self.nodes[idx]["inputs"][pos]
        if out != 0:
            raise self.err(f"uses output {out} of node '{self.name(src)}' (only output 0 is supported)", idx)
        if src not in self.values:
            raise self.err(f"input '{self.name(src)}' is not a tensor computed from the data input", idx)
        return self.values[src], self.rank.get(src)

    def module(self, idx: int, mod: nn.Module, x: fx.Node) -> fx.Node:
        return self.b.module(self.name(idx), mod, x)

    # -- top level -----------------------------------------------------------------------------
    def convert(self) -> fx.GraphModule:
        if len(self.heads) != 1:
            raise EfquantError(f"expected one output head, found {len(self.heads)}", source=self.sym_path,
                               field="heads")
        head = self.heads[0][0]
        order = self._live_nodes(head)
        inp = self._data_input(order)
        in_name = self.name(inp)
        self.values[inp] = self.b.placeholder(in_name)
        self.rank[inp] = 4

        chain, scale, offset, last = self._input_affine(inp)
        if self.normalized_input and chain:
            self.values[last] = emit_normalized_input(self.b, self.values[inp], scale, offset)
            self.rank[last] = 4
        skip = set(chain) if self.normalized_input else set()
        for i in order:
            if self.nodes[i]["op"] == "null" or i in skip:
                continue
            with converting(lambda msg, i=i: self.err(msg, i)):
                self.values[i], self.rank[i] = self._convert(i)
        if head not in self.values:
            raise EfquantError("the output head does not depend on the data input", source=self.sym_path,
                               field="heads")
        meta = preprocessing_meta([self.nodes[i]["op"] for i in chain], scale, offset, self.normalized_input,
                                  bool(skip))
        return self.b.finish(self.values[head], input_name=in_name, output_name=self.name(head),
                             meta_preprocessing=meta)

    def _live_nodes(self, head: int) -> list[int]:
        """Indices of the nodes the head depends on, in file (topological) order; every op checked."""
        live: set[int] = set()
        stack = [head]
        while stack:
            i = stack.pop()
            if i in live:
                continue
            live.add(i)
            for src, *_ in self.nodes[i]["inputs"]:
                self.consumers.setdefault(src, []).append(i)
                stack.append(src)
        order = sorted(live)
        bad: dict[str, list[str]] = {}
        for i in order:
            op = self.nodes[i]["op"]
            if op != "null" and op not in _HANDLERS:
                bad.setdefault(op, []).append(self.name(i))
        if bad:
            raise unsupported_ops_error("MXNet", bad, source=self.sym_path, field="nodes")
        return order

    def _data_input(self, order: list[int]) -> int:
        """The one variable without parameters (normally ``data``)."""
        inputs = [i for i in order if self.nodes[i]["op"] == "null" and self.name(i) not in self.params]
        if len(inputs) > 1 and any(self.name(i) == "data" for i in inputs):
            # the others are parameters missing from the .params file: reported by the node using them
            inputs = [i for i in inputs if self.name(i) == "data"]
        if len(inputs) != 1:
            names = [self.name(i) for i in inputs]
            raise EfquantError(f"expected exactly one data input (a variable without parameters), "
                               f"found {names}", source=self.sym_path, field="nodes")
        return inputs[0]

    def _input_affine(self, inp: int) -> tuple[list[int], np.ndarray, np.ndarray, int]:
        """The leading ``_minus_scalar``/``_mul_scalar``... chain on the data input as one affine."""
        chain: list[int] = []
        scale, offset = np.ones(()), np.zeros(())
        cur = inp
        while len(self.consumers.get(cur, [])) == 1 and cur != self.heads[0][0]:
            nxt = self.consumers[cur][0]
            node = self.nodes[nxt]
            if node["op"] not in _SCALAR_STEP:
                break
            step = affine_step(scale, offset, _SCALAR_STEP[node["op"]], float(self.attrs(node)["scalar"]))
            if step is None:
                break
            scale, offset = step
            chain.append(nxt)
            cur = nxt
        return chain, scale, offset, cur

    def _convert(self, i: int) -> tuple[fx.Node, int | None]:
        node = self.nodes[i]
        handler = _HANDLERS.get(node["op"])
        if handler is None:  # pragma: no cover - _live_nodes refuses these first
            raise self.err("unsupported op", i)
        return handler(self, i, self.attrs(node))


# --------------------------------------------------------------------------------------------
# One function per op: (converter, node index, attributes) -> (output node, output rank)
# --------------------------------------------------------------------------------------------

_Result = tuple[fx.Node, int | None]
_Handler = Callable[[_MxConverter, int, dict[str, Any]], _Result]
_HANDLERS: dict[str, _Handler] = {}


def _handles(*ops: str) -> Callable[[_Handler], _Handler]:
    def register(fn: _Handler) -> _Handler:
        _HANDLERS.update(dict.fromkeys(ops, fn))
        return fn

    return register


@_handles("Convolution")
def _convolution(cv: _MxConverter, i: int, at: dict[str, Any]) -> _Result:
    x, _ = cv.data(i)
    if at.get("layout", "NCHW") not in ("NCHW", "None"):
        raise cv.err(f"layout {at.get('layout')} is not supported", i)
    w = cv.param(i, 1, "weight")
    kernel = _tuple(at.get("kernel"), ())
    if w.ndim != 4 or len(kernel) != 2 or tuple(w.shape[2:]) != kernel:
        raise cv.err(f"only 2-D convolutions are supported (kernel {kernel}, weight {w.shape})", i)
    num_filter = int(at.get("num_filter", w.shape[0]))
    if num_filter != w.shape[0]:
        raise cv.err(f"num_filter={num_filter} but weight has shape {w.shape}", i)
    group = int(at.get("num_group", 1))
    bias = None if _bool(at.get("no_bias"), False) else cv.param(i, 2, "bias")
    conv = conv2d_module(w, bias, stride=_tuple(at.get("stride"), (1, 1)), padding=_tuple(at.get("pad"), (0, 0)),
                         dilation=_tuple(at.get("dilate"), (1, 1)), groups=group)
    return cv.module(i, conv, x), 4


@_handles("BatchNorm")
def _batch_norm(cv: _MxConverter, i: int, at: dict[str, Any]) -> _Result:
    x, rank = cv.data(i)
    if _tuple(at.get("axis"), (1,)) != (1,):
        raise cv.err("only axis=1 is supported", i)
    gamma = cv.param(i, 1, "gamma")
    if _bool(at.get("fix_gamma"), True):  # MXNet's default: gamma is pinned to 1
        gamma = np.ones_like(gamma)
    bn = batchnorm_module(rank, gamma, cv.param(i, 2, "beta"), cv.param(i, 3, "moving_mean"),
                          cv.param(i, 4, "moving_var"), eps=float(at.get("eps", 1e-3)),
                          momentum=1.0 - float(at.get("momentum", 0.9)), where=cv.label(i), source=cv.sym_path)
    return cv.module(i, bn, x), rank


@_handles("LeakyReLU")
def _leaky_relu(cv: _MxConverter, i: int, at: dict[str, Any]) -> _Result:
    x, rank = cv.data(i)
    act = at.get("act_type", "leaky")
    slope = float(at.get("slope", 0.25))
    if act == "prelu":
        mod: nn.Module = prelu_module(cv.param(i, 1, "gamma"), None, where=cv.label(i), source=cv.sym_path)
    elif act == "leaky":
        mod = nn.LeakyReLU(slope)
    elif act == "elu":
        mod = nn.ELU(slope)
    elif act == "selu":
        mod = nn.SELU()
    elif act == "gelu":
        mod = nn.GELU()
    else:
        raise cv.err(f"act_type={act} is not supported", i)
    return cv.module(i, mod, x), rank


_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "softrelu": nn.Softplus,
                "softsign": nn.Softsign}


@_handles("Activation", "SoftmaxActivation")
def _activation(cv: _MxConverter, i: int, at: dict[str, Any]) -> _Result:
    x, rank = cv.data(i)
    act = at.get("act_type", "softmax" if cv.nodes[i]["op"] == "SoftmaxActivation" else None)
    if act not in _ACTIVATIONS:
        raise cv.err(f"act_type={act} is not supported", i)
    return cv.module(i, _ACTIVATIONS[act](), x), rank


@_handles("clip")
def _clip(cv: _MxConverter, i: int, at: dict[str, Any]) -> _Result:
    x, rank = cv.data(i)
    lo, hi = float(at["a_min"]), float(at["a_max"])
    return cv.module(i, nn.ReLU6() if (lo, hi) == (0.0, 6.0) else nn.Hardtanh(lo, hi), x), rank


@_handles("FullyConnected")
def _fully_connected(cv: _MxConverter, i: int, at: dict[str, Any]) -> _Result:
    x, rank = cv.data(i)
    w = cv.param(i, 1, "weight")
    hidden = int(at.get("num_hidden", w.shape[0]))
    if w.ndim != 2 or w.shape[0] != hidden:
        raise cv.err(f"num_hidden={hidden} but weight has shape {w.shape}", i)
    bias = None if _bool(at.get("no_bias"), False) else cv.param(i, 2, "bias")
    if _bool(at.get("flatten"), True) and rank != 2:
        x = cv.b.module(cv.name(i) + "_flatten", nn.Flatten(1), x)
    return cv.module(i, linear_module(w, bias), x), 2


@_handles("Flatten")
def _flatten(cv: _MxConverter, i: int, at: dict[str, Any]) -> _Result:
    x, _ = cv.data(i)
    return cv.module(i, nn.Flatten(1), x), 2


@_handles("Pooling")
def _pooling(cv: _MxConverter, i: int, at: dict[str, Any]) -> _Result:
    x, _ = cv.data(i)
    kind = at.get("pool_type", "max")
    if kind not in ("max", "avg"):
        raise cv.err(f"pool_type={kind} is not supported", i)
    if _bool(at.get("global_pool"), False):
        mod: nn.Module = nn.AdaptiveMaxPool2d(1) if kind == "max" else nn.AdaptiveAvgPool2d(1)
        return cv.module(i, mod, x), 4
    conv = at.get("pooling_convention", "valid")
    if conv not in ("valid", "full"):
        raise cv.err(f"pooling_convention={conv} is not supported", i)
    kernel = _tuple(at.get("kernel"), ())
    if len(kernel) != 2:
        raise cv.err(f"only 2-D pooling is supported (kernel {kernel})", i)
    stride, pad = _tuple(at.get("stride"), (1, 1)), _tuple(at.get("pad"), (0, 0))
    if kind == "max":
        mod = nn.MaxPool2d(kernel, stride, pad, ceil_mode=conv == "full")
    else:
        mod = nn.AvgPool2d(kernel, stride, pad, ceil_mode=conv == "full",
                           count_include_pad=_bool(at.get("count_include_pad"), True))
    return cv.module(i, mod, x), 4


@_handles(*_IDENTITY_OPS)
def _identity(cv: _MxConverter, i: int, at: dict[str, Any]) -> _Result:
    if cv.nodes[i]["op"] == "Cast" and not str(at.get("dtype", "float32")).startswith("float"):
        raise cv.err(f"Cast to {at.get('dtype')} is not supported", i)
    return cv.data(i)


@_handles(*_BINARY_OPS)
def _binary(cv: _MxConverter, i: int, at: dict[str, Any]) -> _Result:
    (a, ra), (b, rb) = cv.data(i, 0), cv.data(i, 1)
    out = cv.b.function(_BINARY_OPS[cv.nodes[i]["op"]], a, b)
    return out, None if ra is None or rb is None else max(ra, rb)


@_handles("add_n", "ElementWiseSum")
def _add_n(cv: _MxConverter, i: int, at: dict[str, Any]) -> _Result:
    acc, rank = cv.data(i, 0)
    for pos in range(1, len(cv.nodes[i]["inputs"])):
        nxt, _ = cv.data(i, pos)
        acc = cv.b.function(operator.add, acc, nxt)
    return acc, rank


_SCALAR_FNS = {"_minus_scalar": operator.sub, "_plus_scalar": operator.add, "_mul_scalar": operator.mul,
               "_div_scalar": operator.truediv}


@_handles(*_SCALAR_STEP)
def _scalar(cv: _MxConverter, i: int, at: dict[str, Any]) -> _Result:
    x, rank = cv.data(i)
    c = float(at["scalar"])
    fn = _SCALAR_FNS.get(cv.nodes[i]["op"])
    if fn is None:  # _rminus_scalar: c - x
        return cv.b.function(operator.sub, c, x), rank
    return cv.b.function(fn, x, c), rank


@_handles("Reshape")
def _reshape(cv: _MxConverter, i: int, at: dict[str, Any]) -> _Result:
    x, _ = cv.data(i)
    shape = _tuple(at.get("shape"), ())
    if not shape or any(d < -1 for d in shape) or _bool(at.get("reverse"), False):
        raise cv.err(f"Reshape shape={shape} (special codes -2/-3/-4, reverse) is not supported", i)
    dims: list[Any] = [cv.b.method("size", x, k) if d == 0 else d for k, d in enumerate(shape)]
    if shape[0] == 0 and -1 not in shape[1:]:
        dims[0] = -1
    return cv.b.method("reshape", x, *dims), len(shape)


@_handles("Concat")
def _concat(cv: _MxConverter, i: int, at: dict[str, Any]) -> _Result:
    parts = [cv.data(i, k)[0] for k in range(len(cv.nodes[i]["inputs"]))]
    return cv.b.function(torch.cat, parts, int(at.get("dim", 1))), cv.data(i, 0)[1]


def load_mxnet_model(symbol_json: str | Path, params_file: str | Path, *,
                     normalized_input: bool = True) -> fx.GraphModule:
    """Build an FX GraphModule (eval mode) from an MXNet symbol JSON and its ``.params`` file.

    ``normalized_input=True`` (default): the module takes RGB ``(x - 127.5) / 127.5``; the symbol's
    own leading ``_minus_scalar``/``_mul_scalar`` normalisation is folded away (module docstring).
    """
    sym_path = Path(symbol_json)
    if not sym_path.is_file():
        raise EfquantError("symbol file not found", source=str(sym_path))
    try:
        symbol = json.loads(sym_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EfquantError(f"not valid JSON ({exc})", source=str(sym_path)) from None
    if not isinstance(symbol, dict) or not isinstance(symbol.get("nodes"), list) or "heads" not in symbol:
        raise EfquantError("not an MXNet symbol (needs 'nodes' and 'heads')", source=str(sym_path))
    try:
        for n in symbol["nodes"]:
            if not isinstance(n["op"], str) or not isinstance(n["name"], str):
                raise TypeError("op/name must be strings")
            for src, *_ in n["inputs"]:
                if not 0 <= int(src) < len(symbol["nodes"]):
                    raise IndexError(f"input index {src} out of range")
        for h in symbol["heads"]:
            if not 0 <= int(h[0]) < len(symbol["nodes"]):
                raise IndexError(f"head index {h[0]} out of range")
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise EfquantError(f"malformed symbol node list ({type(exc).__name__}: {exc})", source=str(sym_path),
                           field="nodes") from None
    args, aux = read_mxnet_params(params_file)
    return _MxConverter(symbol, args, aux, str(sym_path), str(params_file), normalized_input).convert()
