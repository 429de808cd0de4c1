"""The shared LFW fine-tuning list (skipped when the shared folder is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from efquant_fx.data import IdentityBalancedBatchSampler, build_dataset

SHARED = Path(os.environ.get("EFQUANT_SHARED", Path(__file__).resolve().parents[2] / ".." / "shared"))
FINETUNE = SHARED / "data" / "lfw112" / "finetune.txt"

pytestmark = pytest.mark.real_data


@pytest.mark.skipif(not FINETUNE.is_file(), reason=f"shared data not found: {FINETUNE}")
def test_lfw_finetune_list_subset_and_one_batch():
    dataset, report = build_dataset({"kind": "list", "list": str(FINETUNE), "max_images": 1400, "seed": 0})
    assert report.listed == 6181 and report.selected == 1400
    assert report.unreadable == 0 and report.loaded == len(dataset) == 1400
    assert 1 < dataset.num_classes == report.identities <= 1400
    assert sorted(set(dataset.labels)) == list(range(dataset.num_classes))
    sampler = IdentityBalancedBatchSampler(dataset.labels, 8, 4, seed=0)
    images, labels = next(iter(DataLoader(dataset, batch_sampler=sampler)))
    assert images.shape == (32, 3, 112, 112) and labels.shape == (32,)
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.std() > 0.1
