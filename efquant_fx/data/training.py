"""Training data for the fine-tune stage: ``finetune.data`` as a dataset with identity labels."""

from __future__ import annotations

from torch import nn

from efquant_fx.data.base import FaceDataset
from efquant_fx.data.build import build_data
from efquant_fx.data.random import RandomFaceDataset
from efquant_fx.data.report import DataReport
from efquant_fx.data.synthetic import DEFAULT_N as SYNTHETIC_DEFAULT_N
from efquant_fx.datakinds import get_dataset_kind
from efquant_fx.recipe import FinetuneConfig

__all__ = ["SYNTHETIC_DEFAULT_N", "RandomFaceDataset", "build_training_data"]


def build_training_data(cfg: FinetuneConfig, teacher: nn.Module | None, seed: int, *,
                        progress: bool | None = None) -> tuple[FaceDataset, DataReport, bool]:
    """(dataset, report, has_identities) for ``finetune.data``, any registered kind.

    ``has_identities`` is the kind's ``identities`` flag: False when every image has its own label
    (synthetic data), so the sampler cannot draw P identities x K images.
    """
    spec = cfg.data
    dataset, report = build_data(spec.dataset_fields(), train=True, seed=seed, teacher=teacher,
                                 batch_shape=(cfg.identities_per_batch, cfg.images_per_identity),
                                 progress=progress, prefix="finetune.data")
    return dataset, report, get_dataset_kind(spec.kind).identities
