"""Native PyTorch int8 on CPU (x86: fbgemm/oneDNN, ARM: qnnpack) through torch.ao FX.

``torch.ao.quantization`` is deprecated (still shipped in torch 2.13; PT2E was removed from torch
and torchao is not installed here), so this module and :mod:`efquant_fx.graph.observers` are the
only places that touch it, with its DeprecationWarning filtered.

What gets lowered is the *compressed* graph, not the teacher: every Brevitas layer becomes a float
layer holding its already-quantized weights (so GPTQ, bias correction and fine-tuning carry over
and torch.ao's symmetric per-channel [-127, 127] observer lands on the same integer grid), and the
activation points become pass-through modules. Every activation quantizer torch.ao then places on
the tensor of an activation point gets that point's own Brevitas grid (calibrated, possibly
fine-tuned) through a fixed-qparams observer: an 8-bit symmetric point (scale ``s``, integers
-128..127) is quint8 with scale ``s`` and zero point 128, as in the int8 ONNX. Only tensors the
compressed model never quantized (e.g. a network input without a point) are re-observed with a
histogram on the calibration batches (:func:`lower`, ``point_grids``).

torch.ao gives pass-through ops (Identity, pooling, flatten) their input's quantizer; where two
points with different grids would end up sharing one (a residual add's point -> pool -> flatten ->
the Linear's input point), the later point is lowered as a requantization
(``dequantize -> quantize_per_tensor``) so both grids stay as the compressed model has them.

PReLU: lowered the stock way (``nnq.PReLU.from_float``, slopes on their min/max quint8 grid) it
gives wrong values, so PReLU is first kept float (:class:`FloatPReLU`)
and afterwards each ``dequantize -> FloatPReLU -> quantize`` is replaced by ``quantized::prelu``
with the slopes on a grid where 1.0 is exact (:func:`quantize_prelu`, :func:`lower_prelu`). The
kernel multiplies the positive side by the quantized 1.0 of the slopes' grid; on a min/max grid of
slopes below 1.0 that saturates to the largest slope, which is the bug (the per-channel slopes
themselves are applied right). On a 1.0-exact grid it is one integer multiply-add and one
requantization, faster than the float round trip. A PReLU whose slopes sit too coarsely on such a
grid, or whose input scale is not static, stays float.
"""

from __future__ import annotations

import copy
import math
import operator
import time
import warnings
from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from efquant_fx.errors import EfquantError
from efquant_fx.export.bn_fold import fold_quantized_batchnorm
from efquant_fx.export.files import atomic_path
from efquant_fx.export.parity import cosine
from efquant_fx.export.reports import TorchInt8Report
from efquant_fx.graph.modules import ActQuant, QuantPReLU

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch.ao.nn.quantized as nnq
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.observer import (
        FixedQParamsObserver,
        HistogramObserver,
        ObserverBase,
        PerChannelMinMaxObserver,
    )
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx


class FloatPReLU(nn.Module):
    """PReLU that torch.ao leaves in float (a non-traceable leaf it has no pattern for)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.prelu(x, self.weight)


class PointRequant(nn.Module):
    """An activation point lowered as its own quantizer: torch.ao leaves this non-traceable leaf float,
    so it gets ``dequantize`` before and its own ``quantize_per_tensor`` after (see :func:`lower`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def point_qparams(point: ActQuant) -> tuple[float, int] | None:
    """The quint8 (scale, zero point) equal to an 8-bit activation point's Brevitas grid, read from
    its quantizer (the scale is learnable, so not from ``point.range``); None when the point does not
    quantize (disabled, not 8-bit) or its grid is not a quint8 one."""
    if point.mode != "quant":
        return None
    aq = point.quant.act_quant
    with torch.no_grad():
        scale, zero_point, bits = float(aq.scale()), float(aq.zero_point()), int(aq.bit_width())
    signed, narrow = bool(aq.is_signed), bool(aq.is_narrow_range)
    if bits != 8 or narrow or not scale > 0 or not math.isfinite(scale) or zero_point != round(zero_point):
        return None
    zp = int(round(zero_point)) + (128 if signed else 0)  # integers -128..127 -> 0..255, as the ONNX export does
    return (scale, zp) if 0 <= zp <= 255 else None


def quantize_prelu(slopes: torch.Tensor) -> tuple[torch.Tensor, float]:
    """PReLU slopes as the quint8 per-tensor tensor ``quantized::prelu`` needs, and the largest
    slope error. The grid has step ``1/k`` with 1.0 exactly on it (the kernel multiplies the
    positive side by the quantized 1.0) and covers 0 and every slope; ``k`` (at most 255) is the
    one with the smallest error, so slopes such as 0.25 or 0.5 land exactly."""
    w = slopes.detach().float().flatten().cpu()
    lo, hi = min(float(w.min()), 0.0), max(float(w.max()), 1.0)
    best = (math.inf, 1, 0)
    for k in range(int(255 / (hi - lo)), 0, -1):
        zp = math.ceil(-lo * k - 1e-6)
        if zp + hi * k > 255 + 1e-6:
            continue
        err = float(((w * k).round() / k - w).abs().max())
        if err < best[0] - 1e-9:
            best = (err, k, zp)
    err, k, zp = best
    return torch.quantize_per_tensor(w, 1.0 / k, zp, torch.quint8), err


def _qparams(gm: fx.GraphModule, node: fx.Node) -> tuple[float, int] | None:
    """(scale, zero point) of the quint8 tensor a converted-graph node produces, where it is static."""
    def value(arg):
        return getattr(gm, arg.target) if isinstance(arg, fx.Node) and arg.op == "get_attr" else arg

    while node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Identity):
        node = node.args[0]  # the activation points float_view turned into Identity pass the tensor through
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        scale, zp = getattr(m, "scale", None), getattr(m, "zero_point", None)
    elif node.op == "call_function" and node.target is torch.quantize_per_tensor:
        scale, zp = value(node.args[1]), value(node.args[2])
    elif node.op == "call_function" and node.target in (torch.ops.quantized.add, torch.ops.quantized.add_relu):
        scale, zp = value(node.args[2]), value(node.args[3])
    else:
        return None
    if not isinstance(scale, float | int | torch.Tensor) or not isinstance(zp, int | torch.Tensor):
        return None
    return float(scale), int(zp)


def lower_prelu(gm: fx.GraphModule, max_error: float = 2.0) -> tuple[int, int]:
    """Replace ``dequantize -> FloatPReLU -> quantize_per_tensor`` in a converted graph by one
    ``quantized::prelu`` (``nnq.PReLU``) with the slopes from :func:`quantize_prelu`.

    A PReLU is replaced only when the slope rounding can move an output by at most ``max_error``
    output steps before the final rounding (worst case: largest slope error x most negative
    input). The bound is loose: on InsightFace MobileFaceNet-y1 (slopes -1.55..2.39) all 33 PReLU
    pass at 2.0 and the LFW cosine to the float teacher is unchanged (0.9582 on 200 faces, onednn);
    slopes 0..1 are within 1/510. Returns (replaced, kept float).
    """
    graph = gm.graph
    done = kept = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), FloatPReLU):
            continue
        src, users = node.args[0], list(node.users)
        quant = users[0] if len(users) == 1 else None
        ok = (isinstance(src, fx.Node) and src.op == "call_method" and src.target == "dequantize"
              and quant is not None and quant.target is torch.quantize_per_tensor
              and quant.args[3:4] == (torch.quint8,))
        qin = _qparams(gm, src.args[0]) if ok else None
        qout = _qparams(gm, quant) if ok else None
        if qin is None or qout is None:
            kept += 1
            continue
        slopes = gm.get_submodule(node.target).weight
        qweight, err = quantize_prelu(slopes)
        (in_scale, in_zp), (out_scale, out_zp) = qin, qout
        if err * in_scale * max(in_zp, 1) > max_error * out_scale:
            kept += 1
            continue
        qprelu = nnq.PReLU(out_scale, out_zp, slopes.numel())
        qprelu.set_weight(qweight)
        name = node.target.replace(".", "_") + "_quantized"
        gm.add_module(name, qprelu)
        with graph.inserting_before(quant):
            new = graph.call_module(name, (src.args[0],))
        quant.replace_all_uses_with(new)
        graph.erase_node(quant)
        graph.erase_node(node)
        if not src.users:
            graph.erase_node(src)
        done += 1
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return done, kept


def _has_vnni() -> bool:
    """Whether the CPU has AVX-512 VNNI (Linux /proc/cpuinfo; False where that cannot be read)."""
    try:
        return "avx512_vnni" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def pick_engine() -> str:
    """'onednn' on CPUs with AVX-512 VNNI, else 'x86' (else what the build has).

    'x86' itself sends grouped convolutions to oneDNN on VNNI CPUs but keeps depthwise ones on
    fbgemm, which is much slower there (above all on MobileFaceNet's 7x7 global depthwise head);
    the 'fbgemm' engine saturates u8*s8 products without reduce_range.
    """
    engines = torch.backends.quantized.supported_engines
    for engine in (("onednn",) if _has_vnni() else ()) + ("x86", "fbgemm", "qnnpack"):
        if engine in engines:
            return engine
    raise EfquantError(f"this PyTorch build has no int8 CPU engine (supported: {engines})", field="export.formats")


def int8_blockers(model: nn.Module) -> list[str]:
    """Why the model cannot be lowered to 8-bit kernels as it is (empty list: it can)."""
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    reasons = []
    for name, m in model.named_modules():
        if isinstance(m, QuantWeightBiasInputOutputLayer):
            bits = int(m.quant_weight().bit_width)
            if bits != 8:
                reasons.append(f"{name} has {bits}-bit weights")
        elif isinstance(m, ActQuant) and m.bits != 8:
            reasons.append(f"{name} quantizes activations to {m.bits} bits")
    return reasons


@torch.no_grad()
def float_view(model: nn.Module, requant: Collection[str] = ()) -> tuple[fx.GraphModule, list[str]]:
    """The compressed graph in plain float modules carrying the quantized weights.

    Activation points become ``nn.Identity`` under the same name (:class:`PointRequant` for those
    named in ``requant``). Returns the graph and the names of compute layers that were float in the
    compressed model (excluded by the recipe); those stay float in the int8 model too.
    """
    from brevitas.nn import QuantConv2d, QuantLinear

    from efquant_fx.graph.quantize import set_module

    if not isinstance(model, fx.GraphModule):
        raise EfquantError("torch int8 lowering needs the compressed torch.fx GraphModule", field="export")
    gm = copy.deepcopy(model).cpu().eval()
    # BN folded into the *quantized* conv keeps its integer weights (export/bn_fold.py); left to
    # torch.ao's float conv-BN fusion, a depthwise conv of MobileFaceNet-y1 landed up to 68 steps off
    fold_quantized_batchnorm(gm)
    kept_float = []
    for name, m in list(gm.named_modules()):
        if isinstance(m, QuantConv2d):
            new = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                            m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)
        elif isinstance(m, QuantLinear):
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        elif isinstance(m, ActQuant):
            set_module(gm, name, PointRequant() if name in requant else nn.Identity())
            continue
        elif isinstance(m, QuantPReLU | nn.PReLU):
            slopes = m.quantized_slopes() if isinstance(m, QuantPReLU) else m.weight
            set_module(gm, name, FloatPReLU(slopes))
            continue
        else:
            if type(m) in (nn.Conv2d, nn.Linear):
                kept_float.append(name)
            continue
        new.weight.copy_(m.quant_weight().value)
        if m.bias is not None:
            new.bias.copy_(m.bias)
        set_module(gm, name, new)
    gm.eval()  # the new float modules start in training mode; conv-BN fusion needs both in eval
    gm.recompile()
    return gm, kept_float


def _observer_groups(prepared: fx.GraphModule, points: dict[str, tuple[float, int]]) -> list[dict]:
    """torch.ao's activation observers of a prepared graph, one entry per observer instance (torch.ao
    shares one between a pass-through op's input and output), in graph order: its module names, the
    activation points whose tensor it observes (names in graph order) and one observed node name."""
    groups: dict[int, dict] = {}
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        obs = prepared.get_submodule(node.target)
        if not isinstance(obs, ObserverBase):
            continue
        group = groups.setdefault(id(obs), {"observer": obs, "names": [], "points": [], "tensor": None})
        if node.target not in group["names"]:
            group["names"].append(node.target)
        src = node.args[0]
        while isinstance(src, fx.Node) and src.op == "call_module":
            m = prepared.get_submodule(src.target)
            if src.target in points and isinstance(m, nn.Identity | PointRequant):
                if src.target not in group["points"]:
                    group["points"].append(src.target)
                break
            if not isinstance(m, nn.Identity | ObserverBase):
                break
            src = src.args[0]
        if group["tensor"] is None and isinstance(src, fx.Node):
            group["tensor"] = src.name
    return list(groups.values())


_SCALE_OPS = {operator.mul: 1, torch.mul: 1, operator.truediv: -1, torch.div: -1}
_SHIFT_OPS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}


def _grid_factor(prepared: fx.GraphModule, point: str, observer: nn.Module) -> float | None:
    """How much the scale of a shared quantizer changes between where torch.ao applies it (the first
    tensor it observes) and activation point ``point``: a quantized multiply by a scalar ``c`` only
    rescales (``scale * c``), so ``data * c -> point`` needs ``scale / c`` on ``data`` to land on the
    point's grid. None where the chain holds something that does not keep or rescale the grid
    exactly (a scalar add or a multiply by a non-positive scalar)."""
    node = next(n for n in prepared.graph.nodes if n.op == "call_module" and n.target == point)
    factor = 1.0

    def in_group(arg) -> bool:
        return (isinstance(arg, fx.Node) and arg.op == "call_module"
                and prepared.get_submodule(arg.target) is observer)

    while True:
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if len(tensors) != 1 or not in_group(tensors[0]):
            return factor  # the chain's head: torch.ao quantizes this node's output with the shared quantizer
        if node.op == "call_function" and (node.target in _SCALE_OPS or node.target in _SHIFT_OPS):
            scalars = [a for a in node.args if not isinstance(a, fx.Node)]
            c = scalars[0] if len(scalars) == 1 and isinstance(scalars[0], int | float) else None
            if node.target in _SHIFT_OPS:
                if c != 0:
                    return None
            elif c is None or c <= 0:
                return None
            else:
                factor *= float(c) ** _SCALE_OPS[node.target]
        node = tensors[0]
        while in_group(node):
            node = node.args[0]


def _between(prepared: fx.GraphModule, point: str, observer: nn.Module) -> list:
    """The ops (pooling, flatten, ...) between the earlier point that owns shared quantizer ``observer``
    and the later ``point``, which torch.ao would round to the earlier point's grid: module names, and
    ``(function, index among that function's calls)`` for functions."""
    node = next(n for n in prepared.graph.nodes if n.op == "call_module" and n.target == point)
    order = [n for n in prepared.graph.nodes if n.op == "call_function"]
    names: list = []
    while True:
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if len(tensors) != 1:
            return names
        node = tensors[0]
        if node.op == "call_module":
            m = prepared.get_submodule(node.target)
            if isinstance(m, nn.Identity):
                return names  # the earlier point
            if m is not observer and not isinstance(m, ObserverBase):
                names.append(node.target)
        elif node.op == "call_function":
            names.append((node.target, sum(n.target is node.target for n in order[:order.index(node)])))
        else:
            return names


def _prepare(model: nn.Module, example: torch.Tensor, engine: str, reduce_range: bool,
             requant: Collection[str], float_modules: Collection = ()) -> fx.GraphModule:
    gm, kept_float = float_view(model, requant)
    kept_float = [*kept_float, *float_modules]
    weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                                quant_min=-127, quant_max=127)
    act = HistogramObserver.with_args(dtype=torch.quint8, reduce_range=reduce_range)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mapping = get_default_qconfig_mapping(engine).set_global(QConfig(activation=act, weight=weight))
        for name in kept_float:
            if isinstance(name, tuple):
                mapping.set_module_name_object_type_order("", name[0], name[1], None)
            else:
                mapping.set_module_name(name, None)
        custom = PrepareCustomConfig().set_non_traceable_module_classes([FloatPReLU, PointRequant])
        return prepare_fx(gm, mapping, (example,), prepare_custom_config=custom)


def _drop_point_requant(q: fx.GraphModule) -> None:
    """``dequantize -> PointRequant -> quantize_per_tensor`` -> ``dequantize -> quantize_per_tensor``."""
    for node in list(q.graph.nodes):
        if node.op == "call_module" and isinstance(q.get_submodule(node.target), PointRequant):
            node.replace_all_uses_with(node.args[0])
            q.graph.erase_node(node)
    q.graph.eliminate_dead_code()
    q.delete_all_unused_submodules()
    q.recompile()


def lower(model: nn.Module, batches: Sequence[torch.Tensor], *, engine: str | None = None,
          reduce_range: bool = False, quantized_prelu: bool = True, point_grids: bool = True,
          stats: dict | None = None) -> fx.GraphModule:
    """prepare_fx -> observe ``batches`` -> convert_fx (-> :func:`lower_prelu`); returns the int8
    GraphModule.

    ``point_grids=True`` gives every torch.ao activation quantizer on an activation point's tensor
    that point's grid (:func:`point_qparams`, a FixedQParamsObserver); only the others observe the
    batches (histogram). ``point_grids=False`` re-observes all of them (the old behaviour).
    ``reduce_range=False`` uses all 8 activation bits; set it on CPUs without VNNI, where fbgemm's
    u8*s8 accumulation can saturate (the points' 8-bit grids then cannot be used: all re-observed).
    ``quantized_prelu=False`` keeps every PReLU float. ``stats``, when given, is filled with
    ``from_model`` / ``reobserved`` (torch.ao activation quantizers), ``reobserved_tensors`` (their
    node names), ``requantized`` (points lowered as dequantize/quantize), ``float_ops`` (pass-through
    ops before those, run in float so they round to the later point's grid), ``points`` (8-bit points in
    the model) and ``unused_points`` (points no torch.ao quantizer sits on: their tensor stays float).
    """
    engine = engine or pick_engine()
    if not batches:
        raise EfquantError("torch int8 lowering needs calibration batches", field="export.calibration")
    torch.backends.quantized.engine = engine
    example = batches[0][:1].cpu()
    points: dict[str, tuple[float, int]] = {}
    if point_grids and not reduce_range:
        for name, m in model.named_modules():
            qp = point_qparams(m) if isinstance(m, ActQuant) else None
            if qp is not None:
                points[name] = qp
    requant: set[str] = set()
    float_modules: set = set()
    prepared = _prepare(model, example, engine, reduce_range, requant)
    groups = _observer_groups(prepared, points)
    for g in groups:  # a later point that would share an earlier one's quantizer with another grid
        first = points[g["points"][0]] if g["points"] else None
        for p in g["points"][1:]:
            if points[p] != first:
                requant.add(p)
                float_modules.update(_between(prepared, p, g["observer"]))
    if requant:
        prepared = _prepare(model, example, engine, reduce_range, requant, float_modules)
        groups = _observer_groups(prepared, points)
    used: set[str] = set()
    from_model = 0
    reobserved = []
    for g in groups:
        factor = _grid_factor(prepared, g["points"][0], g["observer"]) if g["points"] else None
        if factor is None:
            reobserved.append(g["tensor"])
            continue
        scale, zp = points[g["points"][0]]
        scale /= factor
        used.update(g["points"])
        fixed = FixedQParamsObserver(scale, zp, dtype=torch.quint8, quant_min=0, quant_max=255)
        for name in g["names"]:
            setattr(prepared, name, fixed)
        from_model += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            for x in batches:
                prepared(x.cpu())
        q = convert_fx(prepared)
    if requant:
        _drop_point_requant(q)
    if quantized_prelu:
        lower_prelu(q)
    if stats is not None:
        stats.update(from_model=from_model, reobserved=len(reobserved), reobserved_tensors=reobserved,
                     requantized=len(requant & used), float_ops=len(float_modules), points=len(points),
                     unused_points=sorted(set(points) - used))
    return q


def module_census(model: nn.Module) -> tuple[int, dict[str, int]]:
    """(number of quantized modules, float compute/activation modules by type) of a lowered model."""
    quantized = sum(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())
    floats = Counter(type(m).__name__ for m in model.modules()
                     if isinstance(m, nn.Conv2d | nn.Linear | FloatPReLU | nn.BatchNorm2d | nn.BatchNorm1d)
                     and not type(m).__module__.startswith("torch.ao"))
    return quantized, dict(floats)


def export_torch_int8(model: nn.Module, path: str | Path, *, calibration: Sequence[torch.Tensor],
                      inputs: torch.Tensor | None = None, teacher: nn.Module | None = None,
                      engine: str | None = None) -> TorchInt8Report:
    """Lower the compressed graph to torch int8 kernels and save it as frozen TorchScript at ``path``.

    Load it with ``torch.jit.load(path)`` (set ``torch.backends.quantized.engine`` to the report's
    engine first). Raises EfquantError when weights or activations are not 8-bit.
    """
    blockers = int8_blockers(model)
    if blockers:
        raise EfquantError(f"torch int8 kernels need 8-bit weights and activations: {'; '.join(blockers[:3])}"
                           f"{' ...' if len(blockers) > 3 else ''} (use the onnx_qcdq or packed format)",
                           field="export.formats")
    path = Path(path)
    t0 = time.perf_counter()
    engine = engine or pick_engine()
    stats: dict = {}
    q = lower(model, calibration, engine=engine, stats=stats)
    x = (inputs if inputs is not None else calibration[0]).detach().float().cpu()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        scripted = torch.jit.freeze(torch.jit.trace(q, x[:1]).eval())
        with atomic_path(path) as tmp:
            torch.jit.save(scripted, str(tmp))
        y = scripted(x)
        fake = copy.deepcopy(model).cpu().eval()(x)
        ref = copy.deepcopy(teacher).cpu().eval()(x) if teacher is not None else float_view(model)[0](x)
    quantized, floats = module_census(q)
    notes = [f"{stats['from_model']} of {stats['from_model'] + stats['reobserved']} torch.ao activation quantizers "
             f"use the model's own ActQuant grids; {stats['reobserved']} re-observed on the calibration "
             "batches (tensors the model does not quantize"
             + (f": {', '.join(stats['reobserved_tensors'][:5])}" if stats["reobserved_tensors"] else "") + ")"]
    if stats["requantized"]:
        notes.append(f"{stats['requantized']} activation point(s) lowered as dequantize/quantize (their input's "
                     f"quantizer has another grid; {stats['float_ops']} pass-through op(s) before them run in float)")
    if stats["unused_points"]:
        notes.append(f"{len(stats['unused_points'])} activation point(s) not applied (their tensor stays float "
                     f"in the int8 graph): {', '.join(stats['unused_points'][:5])}")
    if floats.get("FloatPReLU"):
        notes.append(f"{floats['FloatPReLU']} PReLU run in float between dequantize/quantize (input scale not "
                     "static, or slopes too coarse on a quint8 grid with 1.0 on it; see lower_prelu)")
    if floats.get("Conv2d") or floats.get("Linear"):
        notes.append("some Conv2d/Linear stay float (excluded from quantization by the recipe)")
    return TorchInt8Report(
        path=str(path), bytes=path.stat().st_size, engine=engine, images=int(x.shape[0]),
        cosine_vs_float=float(cosine(y, ref).mean()), cosine_vs_compressed=float(cosine(y, fake).mean()),
        quantized_modules=quantized, float_modules=floats, seconds=time.perf_counter() - t0, notes=notes,
    )
