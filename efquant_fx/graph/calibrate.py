"""Activation-range calibration: torch.ao observers record, then Brevitas quantizers take over."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from efquant_fx.graph.modules import ActQuant


def _points(model: nn.Module) -> dict[str, ActQuant]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ActQuant)}


@contextmanager
def points_disabled(model: nn.Module) -> Iterator[None]:
    """Run the model with activation quantization off (weights stay quantized)."""
    points = _points(model).values()
    modes = [p.mode for p in points]
    for p in points:
        p.mode = "float"
    try:
        yield
    finally:
        for p, mode in zip(points, modes, strict=True):
            p.mode = mode


def start_observing(model: nn.Module) -> None:
    for point in _points(model).values():
        point.start_observing()


def freeze_ranges(model: nn.Module) -> list[dict]:
    """Freeze every point that observed data; returns one stats row per point."""
    stats = []
    for name, point in _points(model).items():
        if point.observer is None:
            continue
        seen_min, seen_max = float(point.observer.min_val), float(point.observer.max_val)
        lo, hi = point.freeze()
        stats.append(dict(point=name, bits=point.bits, observer=point.observer_kind,
                          seen_min=seen_min, seen_max=seen_max, range_min=lo, range_max=hi))
    return stats


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> list[dict]:
    """Observe activations on ``batches`` (float pass-through), then freeze the quantizer ranges.

    Runs under ``no_grad`` rather than ``inference_mode`` (Brevitas needs version counters,
    Xilinx/brevitas#1245).
    """
    was_training = model.training
    model.eval()
    start_observing(model)
    n = 0
    for x in batches:
        model(x.to(device))
        n += x.shape[0]
    if n == 0:
        raise ValueError("calibration needs at least one batch")
    stats = freeze_ranges(model)
    for row in stats:
        row["images"] = n
    model.train(was_training)
    return stats
