"""Mixed precision under a bit budget: which layers get more bits, chosen by measured sensitivity.

A uniform 4-bit face model loses its low-FAR tail at a few quantization points (an input whose
range is dominated by a few channels, a layer whose weights carry the identity signal), and which
ones differs between backbones. Instead of hand-written keep-lists, ``quant.budget`` quantizes a
scratch copy at the recipe's bits, calibrates it, and for every layer measures how much closer the
embedding comes to the float model's (mean ``1 - cos`` on calibration faces) when that layer's
weights, or its input activation point, are switched back to float. Candidates are then raised to
``high_bits`` greedily by gain per bit spent until the parameter-weighted weight bits or the
MAC-weighted input-activation bits reach the budget (HAWQ-style, with a measured rather than a
Hessian sensitivity).

The choice becomes ordinary per-layer rules (``match: ^name$``) placed in front of the recipe's
own, so the saved recipe says exactly which layers were raised and a reload rebuilds the same
graph without data.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from efquant_fx.graph.calibrate import calibrate
from efquant_fx.graph.frozen import frozen_quantizers, layer_functional
from efquant_fx.graph.quantize import LayerPlan, quantize_graph
from efquant_fx.graph.reconstruct import quantized_layers
from efquant_fx.recipe import BudgetSpec, LayerRule, QuantConfig

log = logging.getLogger(__name__)

FLOAT_BITS = 32  # a float weight or input counts 32 bits in the averages


@dataclass
class LayerCost:
    name: str
    params: int
    macs: int
    weight_bits: int
    act_bits: int  # of the point feeding it (FLOAT_BITS without one)
    point: str | None


@dataclass
class Candidate:
    kind: str  # "weight" or "act"
    layers: tuple[str, ...]  # the layers a raise touches (an activation point may feed several)
    gain: float  # drop of mean (1 - cos) when switched to float
    bit_units: float  # bits added, times parameters (weight) or MACs (act)


def layer_costs(model: nn.Module, example: torch.Tensor) -> list[LayerCost]:
    """Parameters, MACs and bits of every Brevitas conv/linear of a quantized graph, in execution order."""
    shapes: dict[str, torch.Size] = {}
    rows = quantized_layers(model)
    handles = [layer.register_forward_hook(lambda _m, _a, out, n=name: shapes.__setitem__(n, out.shape))
               for name, layer, _point in rows]
    try:
        with torch.no_grad(), frozen_quantizers(model):
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for name, layer, point in rows:
        shape = shapes[name]
        spatial = int(shape[2] * shape[3]) if len(shape) == 4 else 1
        active = point is not None and point.mode == "quant"
        out.append(LayerCost(name, layer.weight.numel(), layer.weight.numel() * spatial,
                             int(layer.quant_weight().bit_width), point.bits if active else FLOAT_BITS,
                             names[id(point)] if point is not None else None))
    return out


def average_bits(costs: Sequence[LayerCost], float_params: int = 0, float_macs: int = 0) -> dict[str, float]:
    """Parameter-weighted weight bits and MAC-weighted input-activation bits (float layers count 32)."""
    params = sum(c.params for c in costs) + float_params
    macs = sum(c.macs for c in costs) + float_macs
    w = sum(c.weight_bits * c.params for c in costs) + FLOAT_BITS * float_params
    a = sum(c.act_bits * c.macs for c in costs) + FLOAT_BITS * float_macs
    return {"avg_weight_bits": round(w / max(params, 1), 3), "avg_act_bits": round(a / max(macs, 1), 3)}


def _error(model: nn.Module, images: torch.Tensor, reference: torch.Tensor) -> float:
    with torch.no_grad():
        return float(1 - F.cosine_similarity(model(images), reference).mean())


def _switched(module: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], model: nn.Module,
              images: torch.Tensor, reference: torch.Tensor) -> float:
    """The embedding error with ``module`` temporarily running ``forward``."""
    frozen = module.forward
    module.forward = forward  # type: ignore[method-assign]
    try:
        return _error(model, images, reference)
    finally:
        module.forward = frozen  # type: ignore[method-assign]


def _float_weight_forward(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    forward, weight = layer_functional(layer), layer.weight.detach()
    return lambda x: forward(x, weight)


def sensitivities(scratch: fx.GraphModule, costs: Sequence[LayerCost], images: torch.Tensor,
                  reference: torch.Tensor, high: int) -> list[Candidate]:
    """One candidate per layer below ``high`` weight bits and per activation point below ``high`` bits."""
    layers = {name: layer for name, layer, _ in quantized_layers(scratch)}
    consumers: dict[str, list[LayerCost]] = {}
    for c in costs:
        if c.point is not None and c.act_bits < high:
            consumers.setdefault(c.point, []).append(c)
    out = []
    with frozen_quantizers(scratch):
        base = _error(scratch, images, reference)
        for c in costs:
            if c.weight_bits < high:
                layer = layers[c.name]
                err = _switched(layer, _float_weight_forward(layer), scratch, images, reference)
                out.append(Candidate("weight", (c.name,), base - err, (high - c.weight_bits) * c.params))
        for point_name, users in consumers.items():
            err = _switched(scratch.get_submodule(point_name), lambda x: x, scratch, images, reference)
            out.append(Candidate("act", tuple(u.name for u in users), base - err,
                                 sum((high - u.act_bits) * u.macs for u in users)))
    return out


def choose(candidates: Sequence[Candidate], costs: Sequence[LayerCost], budget: BudgetSpec) -> list[Candidate]:
    """Greedy by gain per bit unit, separately for the weight and the activation budget."""
    totals = {"weight": (sum(c.weight_bits * c.params for c in costs), sum(c.params for c in costs)),
              "act": (sum(c.act_bits * c.macs for c in costs), sum(c.macs for c in costs))}
    limit = {"weight": budget.weight_bits, "act": budget.act_bits}
    chosen = []
    for kind in ("weight", "act"):
        used, denom = totals[kind]
        for cand in sorted((c for c in candidates if c.kind == kind and c.gain > 0),
                           key=lambda c: c.gain / c.bit_units, reverse=True):
            if limit[kind] is not None and (used + cand.bit_units) / denom <= limit[kind]:
                used += cand.bit_units
                chosen.append(cand)
    return chosen


def _rules(chosen: Sequence[Candidate], plans: dict[str, LayerPlan], high: int) -> list[LayerRule]:
    """One exact-name rule per raised layer, keeping the bits the recipe gave its other half."""
    bits = {}
    for cand in chosen:
        for name in cand.layers if cand.kind == "weight" else cand.layers[:1]:  # one consumer lifts the point
            wb, ab = bits.get(name, (plans[name].weight_bits, plans[name].act_bits))
            bits[name] = (high, ab) if cand.kind == "weight" else (wb, high)
    return [LayerRule(match=f"^{re.escape(name)}$", weight_bits=wb, act_bits=ab) for name, (wb, ab) in bits.items()]


def search_budget(gm: fx.GraphModule, cfg: QuantConfig, batches: Sequence[torch.Tensor],
                  device: torch.device) -> tuple[QuantConfig, dict]:
    """The recipe's quant config with the budget resolved into per-layer rules, and a report."""
    budget = cfg.budget
    assert budget is not None
    plain = cfg.model_copy(update={"budget": None})
    scratch = copy.deepcopy(gm)
    plans = quantize_graph(scratch, plain)
    scratch.to(device)
    calibrate(scratch, batches, device)
    scratch.eval()
    images = torch.cat([b.to(device) for b in batches])[: budget.images]
    with torch.no_grad():
        reference = gm.eval()(images)
    costs = layer_costs(scratch, images)
    candidates = sensitivities(scratch, costs, images, reference, budget.high_bits)
    chosen = choose(candidates, costs, budget)
    rules = _rules(chosen, plans, budget.high_bits)
    base = average_bits(costs)
    for c in costs:  # what the averages become
        if any(c.name in k.layers for k in chosen if k.kind == "weight"):
            c.weight_bits = budget.high_bits
    raised_points = {c.point for c in costs for k in chosen if k.kind == "act" and c.name in k.layers}
    for c in costs:
        if c.point in raised_points:
            c.act_bits = budget.high_bits
    report = {"base": base, "after": average_bits(costs), "high_bits": budget.high_bits,
              "raised": [{"kind": k.kind, "layers": list(k.layers), "gain": k.gain} for k in chosen],
              "candidates": len(candidates)}
    log.info("bit budget: %d of %d candidates raised to %d bits", len(chosen), len(candidates), budget.high_bits)
    return cfg.model_copy(update={"budget": None, "layers": rules + list(cfg.layers)}), report
