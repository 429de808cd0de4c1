"""What the ONNX and MXNet importers share: the FX graph builder, the torch modules both create, and the
input-normalisation policy.

Both importers turn a foreign graph into a ``torch.fx.GraphModule`` of *standard* modules so that the
quantizer treats an imported model like any built-in backbone; keeping the module factories here means
a Conv, BatchNorm, PReLU or Linear comes out the same whichever format it came from.

Input convention: our datasets produce RGB faces normalised as ``(x - 127.5) / 127.5``. When a graph
starts with its own affine normalisation of raw 0..255 pixels, the importer composes that chain with
:func:`affine_step`, drops it, and emits the equivalent affine on our input
(:func:`emit_normalized_input`), so the module's output equals the original graph fed raw pixels; a
graph without such a chain is assumed to take our input already. ``normalized_input=False`` keeps the
graph's own convention. Channel order is never changed. The module carries ``input_name``,
``output_name`` and ``meta_preprocessing`` (:func:`preprocessing_meta`).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from efquant_fx.errors import EfquantError

STANDARD_MEAN = 127.5
STANDARD_STD = 127.5
STANDARD_INPUT = "RGB, (x - 127.5) / 127.5"

__all__ = [
    "STANDARD_INPUT", "STANDARD_MEAN", "STANDARD_STD", "GraphBuilder", "affine_step", "attach_metadata",
    "batchnorm_module", "conv2d_module", "converting", "emit_normalized_input", "float_tensor",
    "linear_module", "preprocessing_meta", "prelu_module", "unsupported_ops_error",
]


class GraphBuilder:
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
        self.root.register_buffer(target, float_tensor(arr))
        return self.graph.get_attr(target)

    def finish(self, out: fx.Node, **attrs: Any) -> fx.GraphModule:
        """The GraphModule in eval mode, with ``attrs`` attached by :func:`attach_metadata`."""
        self.graph.output(out)
        self.graph.lint()
        gm = fx.GraphModule(self.root, self.graph, class_name="ImportedFaceModel")
        return attach_metadata(gm.eval(), **attrs)


def attach_metadata(gm: fx.GraphModule, **attrs: Any) -> fx.GraphModule:
    """Set attributes that also survive ``copy.deepcopy`` (GraphModule re-inits on copy)."""
    import torch.fx.graph_module as fx_gm

    key = getattr(fx_gm, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")
    gm.meta.setdefault(key, {}).update(attrs)
    for name, value in attrs.items():
        setattr(gm, name, value)
    return gm


@contextmanager
def converting(make_error: Callable[[str], EfquantError]) -> Iterator[None]:
    """Turn numpy/torch complaints about one node's data into that node's EfquantError."""
    try:
        yield
    except EfquantError:
        raise
    except Exception as exc:
        raise make_error(f"cannot convert ({type(exc).__name__}: {exc})") from None


def unsupported_ops_error(fmt: str, bad: dict[str, list[str]], *, source: str, field: str) -> EfquantError:
    """One error listing every unsupported op with up to five node names each."""
    parts = [f"{op} ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''})" for op, names in bad.items()]
    return EfquantError(f"unsupported {fmt} op(s): {'; '.join(parts)}", source=source, field=field)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def float_tensor(arr: np.ndarray) -> torch.Tensor:
    """A float32 copy (numpy views of ONNX/params buffers are read-only)."""
    return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True, order="C"))


def conv2d_module(weight: np.ndarray, bias: np.ndarray | None, *, stride: tuple[int, ...],
                  padding: tuple[int, ...], dilation: tuple[int, ...], groups: int) -> nn.Conv2d:
    """``nn.Conv2d`` holding ``weight`` (out, in/groups, kh, kw) and an optional bias."""
    conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
                     padding=padding, dilation=dilation, groups=groups, bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(float_tensor(weight))
        if bias is not None:
            conv.bias.copy_(float_tensor(bias.reshape(-1)))
    return conv


def linear_module(weight: np.ndarray, bias: np.ndarray | None) -> nn.Linear:
    """``nn.Linear`` holding ``weight`` (out, in); a one-element bias is broadcast."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(float_tensor(weight))
        if bias is not None:
            lin.bias.copy_(float_tensor(bias.reshape(-1)))
    return lin


def batchnorm_module(rank: int | None, gamma, beta, mean, var, eps: float, momentum: float, *, where: str,
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
        bn.weight.copy_(float_tensor(arrays[0]))
        bn.bias.copy_(float_tensor(arrays[1]))
        bn.running_mean.copy_(float_tensor(arrays[2]))
        bn.running_var.copy_(float_tensor(arrays[3]))
    return bn.eval()


def prelu_module(slope: np.ndarray, rank: int | None, *, where: str, source: str) -> nn.PReLU:
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
        mod.weight.copy_(float_tensor(s.reshape(-1)))
    return mod


# --------------------------------------------------------------------------------------------
# Input normalisation
# --------------------------------------------------------------------------------------------


def affine_step(scale: np.ndarray, offset: np.ndarray, kind: str,
                c: np.ndarray | float) -> tuple[np.ndarray, np.ndarray] | None:
    """Compose ``y = scale * raw + offset`` with one more step; None where the step is not affine.

    ``kind``: ``add`` (y + c), ``sub`` (y - c), ``rsub`` (c - y), ``mul`` (y * c), ``div`` (y / c).
    """
    if kind == "add":
        return scale, offset + c
    if kind == "sub":
        return scale, offset - c
    if kind == "rsub":
        return -scale, c - offset
    if kind == "mul":
        return scale * c, offset * c
    if kind == "div" and np.all(np.asarray(c) != 0):
        return scale / c, offset / c
    return None


def emit_normalized_input(builder: GraphBuilder, x: fx.Node, scale: np.ndarray, offset: np.ndarray) -> fx.Node:
    """The graph's ``scale * raw + offset`` computed from our input ``x = (raw - 127.5) / 127.5``.

    Emitted as ``x * a + b`` with the identity parts left out (SFace needs only the multiply).
    """
    a = np.asarray(scale, dtype=np.float64) * STANDARD_STD
    b = np.asarray(scale, dtype=np.float64) * STANDARD_MEAN + np.asarray(offset, dtype=np.float64)
    if not np.all(a == 1.0):
        x = builder.function(operator.mul, x, builder.constant("input_scale", a))
    if np.any(b != 0.0):
        x = builder.function(operator.add, x, builder.constant("input_offset", b))
    return x


def preprocessing_meta(chain: list[str], scale: np.ndarray, offset: np.ndarray, normalized_input: bool,
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
