"""Calibration images: the recipe's ``calibration.data`` (or the caller's tensor) as a list of batches."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from efquant_fx.recipe import DataSpec


def as_batches(data: torch.Tensor | Iterable[Any], batch_size: int, limit: int) -> list[torch.Tensor]:
    """A tensor of images or an iterable of batches (or ``(images, labels)``) as at most ``limit`` images."""
    if isinstance(data, torch.Tensor):
        data = data[:limit]
        return [data[i : i + batch_size] for i in range(0, data.shape[0], batch_size)]
    out, n = [], 0
    for item in data:
        x = item[0] if isinstance(item, list | tuple) else item
        x = x[: limit - n]
        out.append(x)
        n += x.shape[0]
        if n >= limit:
            break
    return out


def calibration_batches(spec: DataSpec, images: int, batch_size: int, seed: int,
                        teacher: nn.Module | None = None) -> list[torch.Tensor]:
    """Images for calibration as a list of batches (kept in memory: a few hundred 112x112 images)."""
    if spec.kind == "random":
        g = torch.Generator().manual_seed(seed)
        n = spec.n or images
        x = torch.rand(min(n, images), 3, 112, 112, generator=g) * 2 - 1
        return as_batches(x, batch_size, images)
    if spec.kind == "synthetic":  # data-free: invert the teacher's BatchNorm statistics (cached on disk)
        from efquant_fx.data.synthetic import synthetic_dataset

        dataset, _report = synthetic_dataset(spec.model_dump(exclude_none=True), teacher, n_default=images,
                                             seed=seed, train=False, prefix="calibration.data")
        return as_batches(dataset.images, batch_size, images)
    from efquant_fx.data import build_dataset  # the data stage; only needed for real images

    dataset, _report = build_dataset(spec.dataset_fields(), train=False, prefix="calibration.data")
    # a seeded shuffle, so a few hundred calibration images span many identities
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:images].tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, order), batch_size=batch_size)
    return as_batches(loader, batch_size, images)
