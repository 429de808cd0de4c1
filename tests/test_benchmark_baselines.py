"""torch.ao FX PTQ with the stock x86 qconfig: the baseline ``benchmarks/compare.py`` measures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from efquant_fx import EfquantError
from efquant_fx.export.torch_int8 import FloatPReLU, module_census

_spec = importlib.util.spec_from_file_location(
    "benchmarks_baselines", Path(__file__).resolve().parents[1] / "benchmarks" / "baselines.py")
_baselines = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_baselines)
default_ptq = _baselines.default_ptq

pytestmark = pytest.mark.filterwarnings("ignore")


def tiny() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.PReLU(8), nn.Conv2d(8, 8, 3, 2, 1),
                        nn.BatchNorm2d(8), nn.PReLU(8), nn.Flatten(), nn.Linear(8 * 8 * 8, 16))
    return net.eval()


@pytest.mark.parametrize("keep_prelu_float", [True, False])
def test_default_ptq_quantizes_and_keeps_the_teacher(keep_prelu_float):
    model = tiny()
    batches = [torch.rand(4, 3, 32, 32) * 2 - 1 for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = default_ptq(model, batches, keep_prelu_float=keep_prelu_float)
    quantized, floats = module_census(q)
    assert quantized >= 3  # two convs and the linear run int8 kernels
    assert ("FloatPReLU" in floats) == keep_prelu_float
    assert any(isinstance(m, FloatPReLU) for m in q.modules()) == keep_prelu_float
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(q(x), model(x)).min()
    if keep_prelu_float:  # the stock mapping runs torch 2.13's quantized::prelu, wrong for per-channel slopes
        assert cos > 0.9
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the float model is untouched


def test_default_ptq_needs_batches():
    with pytest.raises(EfquantError, match="calibration batches"):
        default_ptq(tiny(), [])
