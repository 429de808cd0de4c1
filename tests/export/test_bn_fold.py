"""Integer-kernel export of a graph whose BatchNorms were kept, and of one that already quantizes conv outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from efquant_fx import compress
from efquant_fx.export import export_model
from efquant_fx.export.bn_fold import fold_quantized_batchnorm
from efquant_fx.export.parity import cosine, run, session
from efquant_fx.graph.ptq import reestimate_batchnorm
from tests.conftest import face_batch

pytestmark = pytest.mark.filterwarnings("ignore")
CAL = face_batch(16, seed=2)
CHECK = face_batch(8, seed=3)
POINTS = ["compute_input", "compute_output", "prelu", "residual_add"]


class BlockNet(nn.Module):
    """conv->BN->PReLU, a conv->BN into a residual add, a BN with a negative gamma: insightface's patterns."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=4, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.prelu = nn.PReLU(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(8 * 16, 16)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = x + self.bn2(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def block_net() -> nn.Module:
    torch.manual_seed(0)
    model = BlockNet().eval()
    with torch.no_grad():
        model.prelu.weight.uniform_(0.1, 0.4)
        model.bn2.weight.uniform_(-1.5, 1.5)  # some negative gammas: folding flips those channels' signs
    reestimate_batchnorm(model, [face_batch(8, seed=1)])
    return model


def recipe(**quant) -> dict:
    return {"device": "cpu", "quant": {"batchnorm": "keep", **quant}, "calibration": {"images": 16, "batch_size": 8}}


def test_folding_batchnorm_into_quantized_convs_keeps_integer_weights_and_outputs():
    result = compress(block_net(), recipe(act_points=POINTS), calibration_data=CAL)
    gm = copy.deepcopy(result.model).eval()
    report = fold_quantized_batchnorm(gm)
    assert report.folded == 2 and report.int_weights == 8 * 3 * 9 + 8 * 8 * 9
    assert report.int_weights_changed == 0  # per-channel scales move with the BN scale
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    with torch.no_grad():
        want, got = result.model.eval()(CHECK), gm(CHECK)
    assert cosine(got, want).min() > 0.9999


def test_per_tensor_weights_report_what_folding_moved():
    result = compress(block_net(), recipe(act_points=POINTS, weight_granularity="per_tensor"), calibration_data=CAL)
    report = fold_quantized_batchnorm(copy.deepcopy(result.model).eval())
    assert report.folded == 2 and 0 < report.int_weights_changed <= report.int_weights
    assert "integer weights changed" in report.note()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    out = {}
    for name, points in (("compute_output", POINTS), ("default", None)):
        quant = {"act_points": points} if points else {}
        result = compress(block_net(), recipe(**quant), calibration_data=CAL)
        folder = tmp_path_factory.mktemp(name)
        out[name] = result, export_model(result, folder, formats="onnx_qcdq", inputs=CHECK, calibration=[CAL])
    return out


def test_compute_output_recipe_exports_the_graph_it_calibrated(exports):
    """No point is added at export, so onnxruntime runs the fake-quant model itself, BN folded away."""
    result, reports = exports["compute_output"]
    rep = reports["onnx_qcdq"]
    assert rep.added_output_points == 0
    assert rep.runtime_op_counts.get("QLinearConv") == 2 and "BatchNormalization" not in rep.runtime_op_counts
    assert any("folded 2 BatchNorm" in n for n in rep.notes)
    with torch.no_grad():
        ref = result.model.eval()(CHECK)
    for level in ("disable_all", "enable_all"):
        assert cosine(run(session(rep.path, level, threads=1), CHECK), ref).mean() >= 0.999, level


def test_export_says_when_it_adds_points_the_model_never_saw(exports):
    rep = exports["default"][1]["onnx_qcdq"]
    assert rep.added_output_points == 2
    assert rep.runtime_op_counts.get("QLinearConv") == 2 and "BatchNormalization" not in rep.runtime_op_counts
    assert any("compute_output" in n for n in rep.notes)
