"""Calibration images: the recipe's ``calibration.data`` (or the caller's tensor) as a list of batches."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from efquant_fx.data.build import build_data
from efquant_fx.datakinds import DATASET_KINDS
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
                        teacher: nn.Module | None = None, notes: list[str] | None = None) -> list[torch.Tensor]:
    """Images for calibration as a list of batches (kept in memory: a few hundred 112x112 images).

    Any registered kind (:func:`efquant_fx.data.build.build_data`); generated kinds make ``images``
    unless ``spec.n`` says otherwise. Images held in memory are used in order; images read from disk
    are shuffled with ``seed`` first, so a few hundred of them span many identities. ``notes``
    receives what the data report noted (unreadable images dropped, by name; fewer images than
    asked), so it reaches the result's notes instead of only the log.
    """
    dataset, report = build_data(spec.dataset_fields(), train=False, seed=seed, teacher=teacher, n_default=images,
                                 limit=images, prefix="calibration.data")
    kind = DATASET_KINDS.get(report.kind)
    if notes is not None and not (kind is not None and kind.generated):  # generated images have nothing to drop
        notes.extend(f"calibration data: {note}" for note in report.notes)
    held = getattr(dataset, "images", None)
    if isinstance(held, torch.Tensor):
        return as_batches(held, batch_size, images)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:images].tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, order), batch_size=batch_size)
    return as_batches(loader, batch_size, images)
