"""Brevitas post-training switches, exposed through the recipe, on a small face-net-shaped model."""

import pytest
import torch
from torch import nn

from efquant_fx import compress
from efquant_fx.graph.ptq import reestimate_batchnorm
from tests.conftest import face_batch


class TinyFace(nn.Module):
    """conv-BN-PReLU stem, one residual block, flatten -> fc -> BatchNorm1d, like an iresnet."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=4, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.prelu = nn.PReLU(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(16 * 16, 32)
        self.features = nn.BatchNorm1d(32)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = x + self.bn2(self.conv2(x))
        return self.features(self.fc(torch.flatten(self.pool(x), 1)))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = TinyFace()
    reestimate_batchnorm(m, [face_batch(16, seed=3)])
    return m.eval()


def run(model, **ptq):
    recipe = {"device": "cpu", "quant": {"weight_bits": 4, "act_bits": 8}, "ptq": ptq,
              "calibration": {"images": 32, "batch_size": 16}}
    return compress(model, recipe, calibration_data=torch.cat([face_batch(16, seed=4), face_batch(16, seed=5)]))


def test_bias_correction_reduces_error(tiny):
    plain = run(tiny)
    corrected = run(tiny, bias_correction=True)
    assert corrected.timings["bias_correction"] > 0
    assert corrected.fidelity["cosine_mean"] >= plain.fidelity["cosine_mean"] - 1e-4


def test_gptq_runs_and_skips_excluded_fc(tiny):
    result = run(tiny, gptq=True)
    assert "GPTQ skipped fc" in " ".join(result.notes)
    assert result.fidelity["cosine_mean"] > 0.9


def test_cross_layer_equalization_keeps_function(tiny):
    result = run(tiny, cross_layer_equalization=5)
    assert result.fidelity["cosine_mean"] > 0.9


def test_activation_equalization_runs(tiny):
    result = run(tiny, act_equalization=0.5)
    assert result.summary["quantized_layers"] == 3
    assert result.fidelity["cosine_mean"] > 0.9
