"""Learned rounding: each layer's output error drops, the model gets closer to the teacher, and the
rounded weights stay on the grid their quantizer computes (so a saved run reloads to them)."""

import torch

from efquant_fx import compress
from efquant_fx.graph.reconstruct import quantized_layers
from tests.conftest import face_batch
from tests.finetune.tiny import TinyFaceNet

CAL = face_batch(64, seed=3)
X = face_batch(16, seed=4)


def w4(**ptq) -> dict:
    return {"device": "cpu", "quant": {"weight_bits": 4, "act_bits": 8, "observer": "percentile"}, "ptq": ptq,
            "calibration": {"images": 64, "batch_size": 16}}


def error(model, teacher) -> float:
    with torch.no_grad():
        t = teacher(X)
        return float((model(X) - t).norm() / t.norm())


def test_learned_rounding_lowers_layer_and_model_error():
    teacher = TinyFaceNet()
    nearest = compress(teacher, w4(), calibration_data=CAL)
    learned = compress(teacher, w4(learned_rounding={"iters": 300}), calibration_data=CAL)
    assert any(n.startswith("learned rounding: 4 layer(s), 300 steps each on 48 images") for n in learned.notes)
    rows = learned.reconstruction
    assert [r["layer"] for r in rows] == [name for name, _, _ in quantized_layers(learned.model)]
    assert all(r["error_after"] < r["error_before"] for r in rows)
    assert error(learned.model, teacher) < 0.9 * error(nearest.model, teacher)


def test_rounded_weights_are_integers_of_the_layer_grid():
    learned = compress(TinyFaceNet(), w4(learned_rounding={"iters": 20}), calibration_data=CAL)
    for _name, layer, _point in quantized_layers(learned.model):
        qt = layer.quant_weight()
        assert torch.allclose(layer.weight, qt.int().float() * qt.scale, atol=1e-6)
        assert int(qt.int().abs().max()) <= 7
