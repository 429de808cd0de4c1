"""Frozen quantizers give the Brevitas forward's numbers, and the Brevitas forward comes back after."""

import pytest
import torch

from efquant_fx import compress
from efquant_fx.graph.frozen import frozen_quantizers
from tests.conftest import face_batch
from tests.finetune.tiny import TinyFaceNet

CAL = face_batch(16, seed=3)
X = face_batch(8, seed=5)


@pytest.mark.parametrize("quant", [{"weight_bits": 8, "act_bits": 8},
                                   {"weight_bits": 4, "act_bits": 4, "act_symmetric": False,
                                    "weight_estimator": "mse"}], ids=["w8a8", "w4a4-asym-mse"])
def test_frozen_forward_matches_brevitas(quant):
    model = compress(TinyFaceNet(), {"device": "cpu", "quant": quant, "calibration": {"images": 16, "batch_size": 8}},
                     calibration_data=CAL).model
    with torch.no_grad():
        reference = model(X)
        with frozen_quantizers(model):
            frozen = model(X)
            with frozen_quantizers(model):  # nested (evaluation inside a frozen block): the outer one restores
                assert torch.equal(model(X), frozen)
        again = model(X)
    assert torch.allclose(frozen, reference, atol=1e-5, rtol=1e-4)
    assert torch.equal(again, reference)
    assert all("forward" not in vars(m) for m in model.modules())
