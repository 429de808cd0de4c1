"""Activation-range observers: the only module in efquant-fx that touches ``torch.ao.quantization``.

``torch.ao.quantization`` is deprecated (removal announced since torch 2.10, still shipped in 2.13),
so everything it provides is reached through this adapter. Replacing it means rewriting this file
only: callers see ``make_observer(kind, ...)`` and ``observed_range(observer) -> (lo, hi)``.

Kinds:
- ``minmax``: running min/max over all calibration batches (QuantFace's choice);
- ``moving_average``: exponential moving average of per-batch min/max (robust to one outlier batch);
- ``percentile``: clip at the given percentile of the value histogram;
- ``mse``: the range that minimises the L2 quantization error of the histogram for the target bit
  width (torch.ao's ``HistogramObserver`` search).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

OBSERVER_KINDS = ("minmax", "moving_average", "percentile", "mse")

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch.ao.quantization.observer import (  # noqa: E402
        HistogramObserver,
        MinMaxObserver,
        MovingAverageMinMaxObserver,
    )


def make_observer(kind: str, bits: int, symmetric: bool, percentile: float = 99.99) -> nn.Module:
    """A fresh observer for one activation tensor, sized for ``bits``."""
    if kind not in OBSERVER_KINDS:
        raise ValueError(f"unknown observer {kind!r}; expected one of {OBSERVER_KINDS}")
    if symmetric:
        qscheme, dtype = torch.per_tensor_symmetric, torch.qint8
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qscheme, dtype = torch.per_tensor_affine, torch.quint8
        qmin, qmax = 0, 2**bits - 1
    common = dict(dtype=dtype, qscheme=qscheme, quant_min=qmin, quant_max=qmax)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "minmax":
            obs = MinMaxObserver(**common)
        elif kind == "moving_average":
            obs = MovingAverageMinMaxObserver(averaging_constant=0.1, **common)
        else:
            obs = HistogramObserver(bins=2048, **common)
    obs.efq_kind = kind
    obs.efq_percentile = percentile
    return obs


def observed_range(obs: nn.Module) -> tuple[float, float]:
    """The (lo, hi) float range an observer recommends, always containing 0."""
    kind = getattr(obs, "efq_kind", "minmax")
    if not torch.isfinite(obs.min_val) or not torch.isfinite(obs.max_val):
        raise RuntimeError("observer saw no data")
    if kind in ("minmax", "moving_average"):
        lo, hi = float(obs.min_val), float(obs.max_val)
    elif kind == "percentile":
        lo, hi = _histogram_percentiles(obs, obs.efq_percentile)
    else:  # mse: torch.ao's L2 search, expressed back as a range
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scale, zero_point = obs.calculate_qparams()
        scale, zp = float(scale.reshape(-1)[0]), float(zero_point.reshape(-1)[0])
        lo, hi = (obs.quant_min - zp) * scale, (obs.quant_max - zp) * scale
    return min(lo, 0.0), max(hi, 0.0)


def _histogram_percentiles(obs: nn.Module, percentile: float) -> tuple[float, float]:
    hist = obs.histogram.double()
    total = hist.sum()
    if total <= 0:
        return float(obs.min_val), float(obs.max_val)
    cdf = torch.cumsum(hist, 0) / total
    edges = torch.linspace(float(obs.min_val), float(obs.max_val), hist.numel() + 1, dtype=torch.float64)
    tail = (100.0 - percentile) / 100.0
    lo_idx = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64)))
    hi_idx = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=torch.float64)))
    return float(edges[lo_idx]), float(edges[min(hi_idx + 1, hist.numel())])
