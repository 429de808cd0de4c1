"""Training data for the fine-tune stage: ``finetune.data`` as a dataset with identity labels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from efquant_fx.data.base import FaceDataset, sample_seed
from efquant_fx.data.report import DataReport
from efquant_fx.recipe import FinetuneConfig

SYNTHETIC_DEFAULT_N = 512


class RandomFaceDataset(FaceDataset):
    """``kind: random``: noise images in [-1, 1] with random identity labels (smoke tests, no faces).

    Images are drawn per index from the seed, so nothing is stored; about ``images_per_identity``
    images share each label so P x K batches exist.
    """

    def __init__(self, n: int, images_per_identity: int, min_identities: int, seed: int = 0):
        n_ids = max(min_identities, n // max(images_per_identity, 1))
        g = torch.Generator().manual_seed(seed)
        labels = (torch.randperm(n, generator=g) % n_ids).tolist()
        report = DataReport(source=f"random(n={n}, seed={seed})", kind="random", listed=n, selected=n, loaded=n,
                            identities=len(set(labels)))
        report.notes.append("random noise images, not faces: for smoke tests only")
        super().__init__(list(range(n)), labels, report, seed=seed)

    def read_bytes(self, key: Any) -> bytes:  # pragma: no cover - generated on the fly
        raise NotImplementedError("random images are generated, not read")

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, 0, index))
        return torch.rand(3, 112, 112, generator=g) * 2 - 1, self.labels[index]


def build_training_data(cfg: FinetuneConfig, teacher: nn.Module | None, seed: int, *,
                        progress: bool | None = None) -> tuple[FaceDataset, DataReport, bool]:
    """(dataset, report, has_identities) for ``finetune.data``; synthetic data has one label per image."""
    spec = cfg.data
    data_seed = spec.seed if spec.seed is not None else seed
    if spec.kind == "random":
        p, k = cfg.identities_per_batch, cfg.images_per_identity
        dataset: FaceDataset = RandomFaceDataset(spec.n or 8 * p * k, k, p, data_seed)
        return dataset, dataset.report, True
    if spec.kind == "synthetic":
        from efquant_fx.data.synthetic import synthetic_dataset

        dataset, report = synthetic_dataset(spec.model_dump(exclude_none=True), teacher,
                                            n_default=SYNTHETIC_DEFAULT_N, seed=data_seed, train=True,
                                            progress=progress, prefix="finetune.data")
        return dataset, report, False
    from efquant_fx.data import build_dataset

    fields = spec.dataset_fields()
    fields.setdefault("seed", data_seed)
    dataset, report = build_dataset(fields, train=True, prefix="finetune.data")
    return dataset, report, True
