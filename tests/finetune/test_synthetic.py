"""Data-free images by BN-statistics inversion: loss goes down, cache, FX teachers, recipe wiring."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from efquant_fx import EfquantError, compress
from efquant_fx.data.calibration import calibration_batches
from efquant_fx.data.synthetic import SyntheticDataset, bn_statistics_loss, synthesize, weights_hash
from efquant_fx.graph.trace import trace
from efquant_fx.recipe import DataSpec
from tests.finetune.tiny import TinyFaceNet

BASE = {"device": "cpu", "quant": {"weight_bits": 8, "act_bits": 8},
        "calibration": {"images": 16, "batch_size": 8}}


def test_inversion_lowers_the_bn_loss_and_is_deterministic():
    teacher = TinyFaceNet()
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    noise = torch.rand(8, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1
    images = synthesize(teacher, 8, steps=15, batch_size=8, progress=False)
    assert images.shape == (8, 3, 112, 112) and images.min() >= -1 and images.max() <= 1
    assert bn_statistics_loss(teacher, images) < 0.5 * bn_statistics_loss(teacher, noise)
    assert torch.equal(images, synthesize(teacher, 8, steps=15, batch_size=8, progress=False))
    # the teacher is untouched (weights, BN statistics, mode, requires_grad)
    assert all(torch.equal(state[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training and all(p.requires_grad for p in teacher.parameters())


def test_cache_is_keyed_and_reused(tmp_path):
    teacher = TinyFaceNet()
    first = synthesize(teacher, 4, steps=2, cache=tmp_path, progress=False)
    files = list(tmp_path.glob("synthetic-*.pt"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    t0 = time.perf_counter()
    again = synthesize(teacher, 4, steps=2, cache=tmp_path, progress=False)
    assert torch.equal(first, again) and time.perf_counter() - t0 < 1.0
    synthesize(teacher, 4, steps=3, cache=tmp_path, progress=False)  # other steps -> other file
    synthesize(TinyFaceNet(seed=1), 4, steps=2, cache=tmp_path, progress=False)  # other weights
    assert len(list(tmp_path.glob("synthetic-*.pt"))) == 3
    files[0].write_bytes(b"garbage")  # a damaged cache is rebuilt
    assert torch.equal(synthesize(teacher, 4, steps=2, cache=tmp_path, progress=False), first)
    assert weights_hash(teacher) == weights_hash(TinyFaceNet()) != weights_hash(TinyFaceNet(seed=1))


def test_fx_graph_module_teacher_works():
    gm = trace(TinyFaceNet())
    assert isinstance(gm, torch.fx.GraphModule)
    images = synthesize(gm, 4, steps=3, progress=False)
    assert torch.isfinite(images).all()


def test_model_without_batchnorm_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(EfquantError, match="BatchNorm"):
        synthesize(model, 2, steps=1, progress=False)


def test_dataset_has_one_label_per_image_and_flips():
    images = torch.rand(4, 3, 112, 112) * 2 - 1
    ds = SyntheticDataset(images, train=True, seed=0)
    assert ds.labels == [0, 1, 2, 3] and ds.num_classes == 4
    seen = {bool(torch.equal(ds[i][0], images[i].flip(-1))) for i in range(4) for _ in range(1)}
    ds.set_epoch(1)
    seen |= {bool(torch.equal(ds[i][0], images[i].flip(-1))) for i in range(4)}
    assert seen == {True, False}
    assert torch.equal(SyntheticDataset(images, train=False)[2][0], images[2])


def test_calibration_batches_synthetic(tmp_path):
    spec = DataSpec(kind="synthetic", n=12, cache=str(tmp_path), steps=2)
    batches = calibration_batches(spec, images=12, batch_size=8, seed=0, teacher=TinyFaceNet())
    assert [b.shape[0] for b in batches] == [8, 4]
    with pytest.raises(EfquantError, match="calibration.data.kind: .*teacher"):
        calibration_batches(spec, images=12, batch_size=8, seed=0, teacher=None)


def test_compress_data_free_end_to_end(tmp_path):
    data = {"kind": "synthetic", "n": 16, "steps": 2, "cache": str(tmp_path)}
    recipe = {**BASE, "calibration": {"images": 16, "batch_size": 8, "data": data},
              "finetune": {"steps": 2, "identities_per_batch": 4, "images_per_identity": 2, "lr": 0.01,
                           "data": data}}
    result = compress(TinyFaceNet(), recipe)
    assert len(list(tmp_path.glob("synthetic-*.pt"))) == 1  # calibration and fine-tune share the images
    assert [h["step"] for h in result.history if h["kind"] == "train"] == [1, 2]
    assert any("negative pairs only" in n for n in result.notes)
