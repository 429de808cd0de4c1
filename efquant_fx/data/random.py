"""``kind: random``: noise images in [-1, 1], for smoke tests (no faces involved)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from efquant_fx.data.base import FaceDataset, InMemoryFaceDataset, sample_seed
from efquant_fx.data.report import DataReport
from efquant_fx.datakinds import BuildContext, register_dataset_kind

NOTE = "random noise images, not faces: for smoke tests only"


class RandomFaceDataset(FaceDataset):
    """Training noise with random identity labels.

    Images are drawn per index from the seed, so nothing is stored; about ``images_per_identity``
    images share each label so P x K batches exist.
    """

    def __init__(self, n: int, images_per_identity: int, min_identities: int, seed: int = 0):
        n_ids = max(min_identities, n // max(images_per_identity, 1))
        g = torch.Generator().manual_seed(seed)
        labels = (torch.randperm(n, generator=g) % n_ids).tolist()
        report = DataReport(source=f"random(n={n}, seed={seed})", kind="random", listed=n, selected=n, loaded=n,
                            identities=len(set(labels)))
        report.notes.append(NOTE)
        super().__init__(list(range(n)), labels, report, seed=seed)

    def read_bytes(self, key: Any) -> bytes:  # pragma: no cover - generated on the fly
        raise NotImplementedError("random images are generated, not read")

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, 0, index))
        return torch.rand(3, 112, 112, generator=g) * 2 - 1, self.labels[index]


class RandomImages(InMemoryFaceDataset):
    """Calibration noise: ``n`` images drawn in one go from ``seed``; one label each."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        images = torch.rand(n, 3, 112, 112, generator=g) * 2 - 1
        report = DataReport(source=f"random(n={n}, seed={seed})", kind="random", listed=n, selected=n, loaded=n,
                            identities=n)
        report.notes.append(NOTE)
        super().__init__(images, report, seed=seed)


@register_dataset_kind("random", keys=("n",), generated=True)
def random_dataset(spec: dict[str, Any], ctx: BuildContext) -> FaceDataset:
    """Training: :class:`RandomFaceDataset` of ``n`` images (default: 8 P x K batches) from the data seed.

    Calibration: :class:`RandomImages`, ``min(n, limit)`` images drawn from the caller's seed (not the
    spec's: calibration noise has always come from the run seed, and recipes keep their numbers).
    """
    p, k = ctx.batch_shape
    n = ctx.n or 8 * p * k
    if ctx.train:
        return RandomFaceDataset(n, k, p, ctx.seed)
    return RandomImages(min(n, ctx.limit) if ctx.limit else n, ctx.run_seed)
