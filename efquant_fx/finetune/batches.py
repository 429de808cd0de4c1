"""Fine-tune batches: ``recipe.finetune.data``, P identities x K images per batch, split by rank.

P x K batches give EKD positive pairs. A loader is built per epoch from the position in it, so a resume
continues with the very batch the stopped run would have taken next.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from torch import nn
from torch.utils.data import DataLoader

from efquant_fx.data.base import FaceDataset
from efquant_fx.data.report import DataReport
from efquant_fx.data.sampler import IdentityBalancedBatchSampler
from efquant_fx.data.training import RandomFaceDataset, build_training_data
from efquant_fx.errors import EfquantError
from efquant_fx.finetune.checkpoint import RunState
from efquant_fx.finetune.runtime import DistInfo
from efquant_fx.recipe import FinetuneConfig

log = logging.getLogger(__name__)


@dataclass
class TrainingBatches:
    dataset: FaceDataset
    report: DataReport  # what was loaded, and notes for the result
    has_ids: bool  # real identities (synthetic data has one label per image, so K is 1)
    sampler: IdentityBalancedBatchSampler
    p: int  # identities per batch (per process)
    k: int  # images per identity
    num_workers: int
    pin_memory: bool

    @classmethod
    def build(cls, cfg: FinetuneConfig, teacher: nn.Module, seed: int, info: DistInfo, *, progress: bool,
              pin_memory: bool) -> TrainingBatches:
        dataset, report, has_ids = build_training_data(cfg, teacher, seed, progress=progress if info.main else False)
        if info.main:
            log.info("%s", report.summary())
        p, k = (cfg.identities_per_batch, cfg.images_per_identity) if has_ids else \
            (cfg.identities_per_batch * cfg.images_per_identity, 1)
        try:
            sampler = IdentityBalancedBatchSampler(dataset.labels, p, k, seed=dataset.seed, rank=info.rank,
                                                   world_size=info.world_size)
        except EfquantError as exc:
            raise EfquantError(f"{str(exc).split(': ', 1)[-1]} ({report.loaded} images of {report.identities} "
                               "identities loaded)", source=report.source,
                               field="finetune.identities_per_batch") from None
        # images already in memory load faster in the main process than through worker processes
        in_memory = isinstance(dataset, RandomFaceDataset) or hasattr(dataset, "images")
        cpus = os.cpu_count() or 1
        num_workers = 0 if in_memory or cpus <= 2 else min(4, cpus // info.world_size)
        return cls(dataset, report, has_ids, sampler, p, k, num_workers, pin_memory)

    def loader(self, run: RunState) -> DataLoader:
        """The rest of the current epoch (the next one when it is done); moves ``run`` to that epoch."""
        if run.batch_in_epoch >= len(self.sampler):
            run.epoch, run.batch_in_epoch = run.epoch + 1, 0
        self.sampler.set_epoch(run.epoch)
        self.dataset.set_epoch(run.epoch)
        return DataLoader(self.dataset, batch_sampler=list(self.sampler)[run.batch_in_epoch:],
                          num_workers=self.num_workers, pin_memory=self.pin_memory)
