"""Learned weight rounding, layer by layer (AdaRound, arXiv 2004.10568), on a calibrated graph.

Round-to-nearest is what breaks 4-bit weights on small-data face models, above all in depthwise
convs, while the grid itself (per-channel scales) is fine. For each quantized layer in execution
order, AdaRound learns whether each weight rounds down or up, so that the layer's output on a few
hundred real faces reproduces the *float* model's output for the same faces; its input comes from the
quantized model with every earlier layer already rounded, so errors made upstream are compensated
downstream. Optionally the step size of the activation point in front of the layer is learned too
(LSQ-style), against the same target.

Brevitas ships learned rounding only in ``brevitas_examples`` (layer-wise, and block-wise not on FX
graphs), with a monkeypatch needed on CPU; this is the same objective in a hundred lines over our
own graph. The rounded weights are written back on the grid the layer's weight quantizer computes
(the largest weight of each channel stays on the grid's edge), so the saved state dict reloads to
the same integers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from brevitas.nn import QuantConv2d, QuantLinear
from torch import nn

from efquant_fx.graph.fakequant import fast_fake_quant
from efquant_fx.graph.frozen import frozen_quantizers, layer_functional
from efquant_fx.graph.modules import ActQuant

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretched sigmoid


@dataclass(frozen=True)
class RoundingConfig:
    iters: int = 200
    batch_size: int = 32
    lr: float = 1e-2
    reg_weight: float = 0.01
    warmup: float = 0.2  # fraction of iterations before the rounding regulariser starts
    beta: tuple[float, float] = (20.0, 2.0)
    learn_act_scale: bool = True


class _StopForward(Exception):
    pass


def quantized_layers(gm: fx.GraphModule) -> list[tuple[str, nn.Module, ActQuant | None]]:
    """(name, layer, activation point feeding it) for every Brevitas conv/linear, in execution order."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        layer = gm.get_submodule(str(node.target))
        if isinstance(layer, QuantConv2d | QuantLinear):
            src = node.args[0]
            point = gm.get_submodule(str(src.target)) if isinstance(src, fx.Node) and src.op == "call_module" else None
            out.append((str(node.target), layer, point if isinstance(point, ActQuant) else None))
    return out


@torch.no_grad()
def _capture(model: nn.Module, module: nn.Module, batches: Sequence[torch.Tensor], device: torch.device,
             want: str) -> torch.Tensor:
    """``module``'s input (``want='input'``) or output for every batch, stopping the forward there."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        seen.append((args[0] if want == "input" else out).detach())
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        for x in batches:
            try:
                model(x.to(device))
            except _StopForward:
                pass
    finally:
        handle.remove()
    return torch.cat(seen)


def _grid(layer: nn.Module) -> tuple[torch.Tensor, int, int] | None:
    """(per-channel scale, qmin, qmax) of a symmetric weight quantizer; None for asymmetric weights."""
    qt = layer.quant_weight()
    if bool((qt.zero_point != 0).any()) or not bool(qt.signed):
        return None
    bits = int(qt.bit_width)
    ints = qt.int()
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax if int(ints.min()) >= -qmax else -qmax - 1
    return qt.scale.detach(), qmin, qmax


def _rounding_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


def _learn_rounding(layer: nn.Module, point: ActQuant | None, x: torch.Tensor, target: torch.Tensor,
                    grid: tuple[torch.Tensor, int, int], cfg: RoundingConfig) -> torch.Tensor:
    """The integer weights (``[out, ...]``) that minimise the output error on ``x`` -> ``target``."""
    scale, qmin, qmax = grid
    w = layer.weight.detach()
    floor = torch.floor(w / scale)
    rest = (w / scale - floor).clamp(1e-4, 1 - 1e-4)
    v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(v) == rest: starts at the float weight
    params = [v]
    act_params = [p for p in point.parameters() if p.requires_grad] if point is not None and cfg.learn_act_scale \
        else []
    opt = torch.optim.Adam([{"params": params, "lr": cfg.lr}, {"params": act_params, "lr": cfg.lr * 0.1}])
    forward = layer_functional(layer)
    g = torch.Generator(device="cpu").manual_seed(0)
    warm = int(cfg.warmup * cfg.iters)
    with fast_fake_quant(point) if point is not None else nullcontext():  # the input step's LSQ gradient, fused
        for it in range(cfg.iters):
            idx = torch.randint(0, x.shape[0], (min(cfg.batch_size, x.shape[0]),), generator=g)
            xb = x[idx]
            if point is not None:
                xb = point(xb)
            h = torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)
            wq = torch.clamp(floor + h, qmin, qmax) * scale
            loss = F.mse_loss(forward(xb, wq), target[idx])
            if it >= warm:
                t = (it - warm) / max(1, cfg.iters - warm)
                beta = cfg.beta[1] + 0.5 * (cfg.beta[0] - cfg.beta[1]) * (1 + math.cos(math.pi * t))
                loss = loss + cfg.reg_weight * _rounding_loss(h, beta) / h.numel()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        ints = torch.clamp(floor + (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA >= 0.5).float(), qmin, qmax)
        # the largest weight of each channel stays on the grid's edge, so the quantizer's abs-max scale is kept
        flat_w, flat_i = w.flatten(1), ints.flatten(1)
        top = flat_w.abs().argmax(dim=1, keepdim=True)
        flat_i.scatter_(1, top, torch.sign(flat_w.gather(1, top)) * qmax)
        return flat_i.view_as(w)


def _write_back(layer: nn.Module, ints: torch.Tensor) -> bool:
    """Put ``ints * scale`` into the layer; False (and the layer untouched) if its quantizer would not
    give those integers back."""
    old = layer.weight.detach().clone()
    scale = layer.quant_weight().scale.detach()
    with torch.no_grad():
        layer.weight.copy_(ints * scale)
        if torch.equal(layer.quant_weight().int().float(), ints):
            return True
        layer.weight.copy_(old)
    return False


def _float_twin(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` that computes in float (points off, layers on their float weights): the target."""
    import copy

    twin = copy.deepcopy(gm)
    for m in twin.modules():
        if isinstance(m, ActQuant):
            m.mode = "float"
        elif isinstance(m, QuantConv2d | QuantLinear):
            m.forward = (lambda x, m=m: layer_functional(m)(x, m.weight))  # type: ignore[method-assign]
    return twin.eval()


@torch.no_grad()
def _error(layer: nn.Module, point: ActQuant | None, x: torch.Tensor, target: torch.Tensor) -> float:
    xb = point(x[:64]) if point is not None else x[:64]
    return float(F.mse_loss(layer(xb), target[:64]) / target[:64].pow(2).mean().clamp_min(1e-12))


def reconstruct_rounding(gm: fx.GraphModule, batches: Sequence[torch.Tensor], device: torch.device | str = "cpu",
                         cfg: RoundingConfig | None = None, progress: Callable[[str], None] | None = None,
                         ) -> list[dict]:
    """Learn the rounding of every symmetric quantized layer of ``gm`` in place; one report row per layer
    (relative output error before/after on the first 64 images, seconds)."""
    cfg = cfg or RoundingConfig()
    device = torch.device(device)
    gm.eval()
    twin = _float_twin(gm)
    rows = []
    layers = quantized_layers(gm)
    for i, (name, layer, point) in enumerate(layers):
        grid = _grid(layer)
        if grid is None:
            rows.append({"layer": name, "skipped": "asymmetric weights"})
            continue
        t0 = time.perf_counter()
        target = _capture(twin, twin.get_submodule(name), batches, device, "output")
        learn_point = point if cfg.learn_act_scale else None
        with frozen_quantizers(gm):  # the quantized model's forward, minus Brevitas's per-call overheads
            x = _capture(gm, learn_point if learn_point is not None else layer, batches, device, "input")
        before = _error(layer, learn_point, x, target)
        ints = _learn_rounding(layer, learn_point, x, target, grid, cfg)
        kept = _write_back(layer, ints)
        row = {"layer": name, "error_before": before, "error_after": _error(layer, learn_point, x, target),
               "seconds": time.perf_counter() - t0}
        if not kept:
            row["skipped"] = "the rounded weights did not survive the weight quantizer; round-to-nearest kept"
        rows.append(row)
        message = (f"learned rounding {i + 1}/{len(layers)} {name}: output error {before:.4g} -> "
                   f"{row['error_after']:.4g} ({row['seconds']:.1f} s)")
        log.info("%s", message)
        if progress is not None:
            progress(message)
        del x, target
    return rows
