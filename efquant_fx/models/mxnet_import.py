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

Input convention (same policy as :mod:`efquant_fx.models.onnx_import`)
------------------------------------------------------------------------
By default (``normalized_input=True``) the module takes RGB ``(x - 127.5) / 127.5``. insightface
symbols start with ``_minus_scalar 127.5`` / ``_mul_scalar 0.0078125`` on raw 0..255 pixels; that
leading scalar chain is removed and replaced by the equivalent affine on our input
(``0.99609375 * x`` for MobileFaceNet y1), so outputs equal the original on raw pixels. A symbol
without such a chain is assumed to take normalised input. ``normalized_input=False`` keeps the
symbol's own convention. Channel order is unchanged (insightface models are RGB).
"""

from __future__ import annotations

import json
import operator
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from efquant_fx.errors import EfquantError
from efquant_fx.models.onnx_import import (
    _affine_to_normalized,
    _attach,
    _batchnorm,
    _emit_affine,
    _GraphBuilder,
    _prelu,
    _preprocessing_meta,
    _tensor,
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


_SCALAR_OPS = {"_minus_scalar", "_plus_scalar", "_mul_scalar", "_div_scalar", "_rminus_scalar"}
_IDENTITY_OPS = {"Dropout", "BlockGrad", "_copy", "identity", "stop_gradient", "Cast"}
_ADD_OPS = {"elemwise_add", "_plus", "_Plus", "broadcast_add", "_add"}
_SUPPORTED = {
    "Convolution", "BatchNorm", "LeakyReLU", "Activation", "FullyConnected", "Flatten", "Pooling",
    "Reshape", "Concat", "elemwise_sub", "elemwise_mul", "broadcast_sub", "broadcast_mul", "add_n",
    "ElementWiseSum", "clip", "SoftmaxActivation", *_SCALAR_OPS, *_IDENTITY_OPS, *_ADD_OPS,
}


class _MxConverter:
    def __init__(self, symbol: dict[str, Any], args: dict[str, np.ndarray], aux: dict[str, np.ndarray],
                 sym_path: str, params_path: str, normalized_input: bool) -> None:
        self.nodes = symbol["nodes"]
        self.heads = symbol["heads"]
        self.params = {**args, **aux}
        self.sym_path, self.params_path = sym_path, params_path
        self.normalized_input = normalized_input
        self.b = _GraphBuilder()
        self.values: dict[int, fx.Node] = {}
        self.rank: dict[int, int | None] = {}
        self.consumers: dict[int, list[int]] = {}

    def err(self, msg: str, idx: int) -> EfquantError:
        node = self.nodes[idx]
        return EfquantError(msg, source=self.sym_path, field=f"{node['op']} node '{node['name']}'")

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
            src_name = self.nodes[src]["name"]
            raise self.err(f"uses output {out} of node '{src_name}' (only output 0 is supported)", idx)
        if src not in self.values:
            src_name = self.nodes[src]["name"]
            raise self.err(f"input '{src_name}' is not a tensor computed from the data input", idx)
        return self.values[src], self.rank.get(src)

    def convert(self) -> fx.GraphModule:
        if len(self.heads) != 1:
            raise EfquantError(f"expected one output head, found {len(self.heads)}", source=self.sym_path,
                               field="heads")
        head = self.heads[0][0]
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
            if op != "null" and op not in _SUPPORTED:
                bad.setdefault(op, []).append(self.nodes[i]["name"])
        if bad:
            parts = [f"{op} ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''})"
                     for op, names in bad.items()]
            raise EfquantError(f"unsupported MXNet op(s): {'; '.join(parts)}", source=self.sym_path,
                               field="nodes")
        inputs = [i for i in order
                  if self.nodes[i]["op"] == "null" and self.nodes[i]["name"] not in self.params]
        if len(inputs) > 1 and any(self.nodes[i]["name"] == "data" for i in inputs):
            # the others are parameters missing from the .params file: reported by the node using them
            inputs = [i for i in inputs if self.nodes[i]["name"] == "data"]
        if len(inputs) != 1:
            names = [self.nodes[i]["name"] for i in inputs]
            raise EfquantError(f"expected exactly one data input (a variable without parameters), "
                               f"found {names}", source=self.sym_path, field="nodes")
        inp = inputs[0]
        in_name = self.nodes[inp]["name"]
        self.values[inp] = self.b.placeholder(in_name)
        self.rank[inp] = 4

        chain, scale, offset, last = self._input_affine(inp)
        if self.normalized_input and chain:
            a, b = _affine_to_normalized(scale, offset)
            self.values[last] = _emit_affine(self.b, self.values[inp], a, b)
            self.rank[last] = 4
        skip = set(chain) if self.normalized_input else set()
        for i in order:
            if self.nodes[i]["op"] == "null" or i in skip:
                continue
            try:
                out, rank = self._convert(i)
            except EfquantError:
                raise
            except Exception as exc:
                raise self.err(f"cannot convert ({type(exc).__name__}: {exc})", i) from None
            self.values[i], self.rank[i] = out, rank
        if head not in self.values:
            raise EfquantError("the output head does not depend on the data input", source=self.sym_path,
                               field="heads")
        meta = _preprocessing_meta([self.nodes[i]["op"] for i in chain], scale, offset, self.normalized_input,
                                   bool(skip))
        return _attach(self.b.finish(self.values[head]), input_name=in_name,
                       output_name=self.nodes[head]["name"], meta_preprocessing=meta)

    def _input_affine(self, inp: int) -> tuple[list[int], np.ndarray, np.ndarray, int]:
        """The leading ``_minus_scalar``/``_mul_scalar``... chain on the data input as one affine."""
        chain: list[int] = []
        scale, offset = np.ones(()), np.zeros(())
        cur = inp
        while len(self.consumers.get(cur, [])) == 1 and cur != self.heads[0][0]:
            nxt = self.consumers[cur][0]
            node = self.nodes[nxt]
            if node["op"] not in _SCALAR_OPS:
                break
            c = float(self.attrs(node)["scalar"])
            if node["op"] == "_minus_scalar":
                offset = offset - c
            elif node["op"] == "_plus_scalar":
                offset = offset + c
            elif node["op"] == "_mul_scalar":
                scale, offset = scale * c, offset * c
            elif node["op"] == "_div_scalar" and c != 0:
                scale, offset = scale / c, offset / c
            elif node["op"] == "_rminus_scalar":
                scale, offset = -scale, c - offset
            else:
                break
            chain.append(nxt)
            cur = nxt
        return chain, scale, offset, cur

    def _convert(self, i: int) -> tuple[fx.Node, int | None]:
        node = self.nodes[i]
        op, name, at = node["op"], node["name"], self.attrs(node)
        if op == "Convolution":
            return self._conv(i, at), 4
        if op == "BatchNorm":
            x, rank = self.data(i)
            if _tuple(at.get("axis"), (1,)) != (1,):
                raise self.err("only axis=1 is supported", i)
            gamma = self.param(i, 1, "gamma")
            if _bool(at.get("fix_gamma"), True):  # MXNet's default: gamma is pinned to 1
                gamma = np.ones_like(gamma)
            bn = _batchnorm(rank, gamma, self.param(i, 2, "beta"), self.param(i, 3, "moving_mean"),
                            self.param(i, 4, "moving_var"), eps=float(at.get("eps", 1e-3)),
                            momentum=1.0 - float(at.get("momentum", 0.9)), where=f"BatchNorm node '{name}'",
                            source=self.sym_path)
            return self.b.module(name, bn, x), rank
        if op == "LeakyReLU":
            x, rank = self.data(i)
            act = at.get("act_type", "leaky")
            slope = float(at.get("slope", 0.25))
            if act == "prelu":
                mod: nn.Module = _prelu(self.param(i, 1, "gamma"), None, where=f"LeakyReLU node '{name}'",
                                        source=self.sym_path)
            elif act == "leaky":
                mod = nn.LeakyReLU(slope)
            elif act == "elu":
                mod = nn.ELU(slope)
            elif act == "selu":
                mod = nn.SELU()
            elif act == "gelu":
                mod = nn.GELU()
            else:
                raise self.err(f"act_type={act} is not supported", i)
            return self.b.module(name, mod, x), rank
        if op in ("Activation", "SoftmaxActivation"):
            x, rank = self.data(i)
            act = at.get("act_type", "softmax" if op == "SoftmaxActivation" else None)
            mods = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "softrelu": nn.Softplus,
                    "softsign": nn.Softsign}
            if act not in mods:
                raise self.err(f"act_type={act} is not supported", i)
            return self.b.module(name, mods[act](), x), rank
        if op == "clip":
            x, rank = self.data(i)
            lo, hi = float(at["a_min"]), float(at["a_max"])
            return self.b.module(name, nn.ReLU6() if (lo, hi) == (0.0, 6.0) else nn.Hardtanh(lo, hi), x), rank
        if op == "FullyConnected":
            return self._fc(i, at), 2
        if op == "Flatten":
            x, _ = self.data(i)
            return self.b.module(name, nn.Flatten(1), x), 2
        if op == "Pooling":
            return self._pool(i, at), 4
        if op in _IDENTITY_OPS:
            if op == "Cast" and not str(at.get("dtype", "float32")).startswith("float"):
                raise self.err(f"Cast to {at.get('dtype')} is not supported", i)
            return self.data(i)
        if op in _ADD_OPS or op in ("elemwise_sub", "elemwise_mul", "broadcast_sub", "broadcast_mul"):
            fn = operator.add if op in _ADD_OPS else operator.sub if op.endswith("sub") else operator.mul
            (a, ra), (b, rb) = self.data(i, 0), self.data(i, 1)
            return self.b.function(fn, a, b), None if ra is None or rb is None else max(ra, rb)
        if op in ("add_n", "ElementWiseSum"):
            acc, rank = self.data(i, 0)
            for pos in range(1, len(node["inputs"])):
                nxt, _ = self.data(i, pos)
                acc = self.b.function(operator.add, acc, nxt)
            return acc, rank
        if op in _SCALAR_OPS:
            x, rank = self.data(i)
            c = float(at["scalar"])
            fn = {"_minus_scalar": operator.sub, "_plus_scalar": operator.add, "_mul_scalar": operator.mul,
                  "_div_scalar": operator.truediv}.get(op)
            if fn is None:  # _rminus_scalar: c - x
                return self.b.function(operator.sub, c, x), rank
            return self.b.function(fn, x, c), rank
        if op == "Reshape":
            x, _ = self.data(i)
            shape = _tuple(at.get("shape"), ())
            if not shape or any(d < -1 for d in shape) or _bool(at.get("reverse"), False):
                raise self.err(f"Reshape shape={shape} (special codes -2/-3/-4, reverse) is not supported", i)
            dims: list[Any] = [self.b.method("size", x, k) if d == 0 else d for k, d in enumerate(shape)]
            if shape[0] == 0 and -1 not in shape[1:]:
                dims[0] = -1
            return self.b.method("reshape", x, *dims), len(shape)
        if op == "Concat":
            parts = [self.data(i, k)[0] for k in range(len(node["inputs"]))]
            return self.b.function(torch.cat, parts, int(at.get("dim", 1))), self.data(i, 0)[1]
        raise self.err("unsupported op", i)  # pragma: no cover - guarded by _SUPPORTED

    def _conv(self, i: int, at: dict[str, Any]) -> fx.Node:
        x, rank = self.data(i)
        name = self.nodes[i]["name"]
        if at.get("layout", "NCHW") not in ("NCHW", "None"):
            raise self.err(f"layout {at.get('layout')} is not supported", i)
        w = self.param(i, 1, "weight")
        kernel = _tuple(at.get("kernel"), ())
        if w.ndim != 4 or len(kernel) != 2 or tuple(w.shape[2:]) != kernel:
            raise self.err(f"only 2-D convolutions are supported (kernel {kernel}, weight {w.shape})", i)
        num_filter = int(at.get("num_filter", w.shape[0]))
        if num_filter != w.shape[0]:
            raise self.err(f"num_filter={num_filter} but weight has shape {w.shape}", i)
        group = int(at.get("num_group", 1))
        no_bias = _bool(at.get("no_bias"), False)
        bias = None if no_bias else self.param(i, 2, "bias")
        conv = nn.Conv2d(w.shape[1] * group, w.shape[0], kernel, stride=_tuple(at.get("stride"), (1, 1)),
                         padding=_tuple(at.get("pad"), (0, 0)), dilation=_tuple(at.get("dilate"), (1, 1)),
                         groups=group, bias=bias is not None)
        with torch.no_grad():
            conv.weight.copy_(_tensor(w))
            if bias is not None:
                conv.bias.copy_(_tensor(bias.reshape(-1)))
        return self.b.module(name, conv, x)

    def _fc(self, i: int, at: dict[str, Any]) -> fx.Node:
        x, rank = self.data(i)
        name = self.nodes[i]["name"]
        w = self.param(i, 1, "weight")
        hidden = int(at.get("num_hidden", w.shape[0]))
        if w.ndim != 2 or w.shape[0] != hidden:
            raise self.err(f"num_hidden={hidden} but weight has shape {w.shape}", i)
        bias = None if _bool(at.get("no_bias"), False) else self.param(i, 2, "bias")
        if _bool(at.get("flatten"), True) and rank != 2:
            x = self.b.module(name + "_flatten", nn.Flatten(1), x)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        with torch.no_grad():
            lin.weight.copy_(_tensor(w))
            if bias is not None:
                lin.bias.copy_(_tensor(bias.reshape(-1)))
        return self.b.module(name, lin, x)

    def _pool(self, i: int, at: dict[str, Any]) -> fx.Node:
        x, _ = self.data(i)
        name = self.nodes[i]["name"]
        kind = at.get("pool_type", "max")
        if kind not in ("max", "avg"):
            raise self.err(f"pool_type={kind} is not supported", i)
        if _bool(at.get("global_pool"), False):
            mod: nn.Module = nn.AdaptiveMaxPool2d(1) if kind == "max" else nn.AdaptiveAvgPool2d(1)
            return self.b.module(name, mod, x)
        conv = at.get("pooling_convention", "valid")
        if conv not in ("valid", "full"):
            raise self.err(f"pooling_convention={conv} is not supported", i)
        kernel = _tuple(at.get("kernel"), ())
        if len(kernel) != 2:
            raise self.err(f"only 2-D pooling is supported (kernel {kernel})", i)
        stride, pad = _tuple(at.get("stride"), (1, 1)), _tuple(at.get("pad"), (0, 0))
        if kind == "max":
            mod = nn.MaxPool2d(kernel, stride, pad, ceil_mode=conv == "full")
        else:
            mod = nn.AvgPool2d(kernel, stride, pad, ceil_mode=conv == "full",
                               count_include_pad=_bool(at.get("count_include_pad"), True))
        return self.b.module(name, mod, x)


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
