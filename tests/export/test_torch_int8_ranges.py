"""torch int8 lowering keeps the activation grids the compressed model calibrated (and fine-tuned)."""

from __future__ import annotations

import pytest
import torch

from efquant_fx import compress
from efquant_fx.export import export_model
from efquant_fx.export.parity import cosine
from efquant_fx.export.torch_int8 import lower, point_qparams
from efquant_fx.graph.modules import ActQuant
from tests.export.test_bn_fold import CAL, CHECK, POINTS, block_net, recipe

pytestmark = pytest.mark.filterwarnings("ignore")
ENGINE = "onednn" if "onednn" in torch.backends.quantized.supported_engines else None


def _compress(points, symmetric=True):
    quant = {"act_points": points} if points else {}
    return compress(block_net(), recipe(act_symmetric=symmetric, **quant), calibration_data=CAL).model.eval()


def _gap(q, fake) -> tuple[float, float]:
    with torch.no_grad():
        y, ref = q(CHECK), fake(CHECK)
    return float(cosine(y, ref).min()), float((y - ref).abs().max())


@pytest.mark.parametrize("symmetric", [True, False])
def test_every_torch_quantizer_from_the_model_matches_fake_quant(symmetric):
    fake = _compress(POINTS + ["output"], symmetric)
    stats: dict = {}
    q = lower(fake, [CAL], engine=ENGINE, stats=stats)
    assert stats["reobserved"] == 0 and stats["from_model"] == 7 and not stats["unused_points"]
    assert stats["requantized"] == 1  # flatten's point: torch.ao would give pool/flatten the add's grid
    cos_after, err_after = _gap(q, fake)
    cos_before, err_before = _gap(lower(fake, [CAL], engine=ENGINE, point_grids=False), fake)
    assert cos_after >= 0.9998
    assert 1 - cos_after < 0.5 * (1 - cos_before) and err_after < 0.6 * err_before
    # the input quantize uses the input point's Brevitas grid (symmetric: zero point 128)
    points = {n: m for n, m in fake.named_modules() if isinstance(m, ActQuant)}
    scale, zp = point_qparams(points["x_act_quant"])
    quantize = next(n for n in q.graph.nodes if n.target is torch.quantize_per_tensor)
    assert float(getattr(q, quantize.args[1].target)) == pytest.approx(scale, rel=1e-6)
    assert int(getattr(q, quantize.args[2].target)) == zp
    assert zp == 128 or not symmetric
    assert any(type(m).__name__ == "PReLU" and type(m).__module__.startswith("torch.ao") for m in q.modules())


def test_learned_scales_are_used_not_reobserved_ranges():
    """Fine-tuning moves ActQuant scales away from the calibrated range; torch int8 must follow them."""
    fake = _compress(POINTS)
    with torch.no_grad():
        for name in ("bn1_act_quant", "add_act_quant"):  # much tighter learned grids: the fake model clips
            tq = fake.get_submodule(name).quant.act_quant.fused_activation_quant_proxy.tensor_quant
            tq.scaling_impl.value.mul_(0.3)
    cos_after, _ = _gap(lower(fake, [CAL], engine=ENGINE), fake)
    cos_before, _ = _gap(lower(fake, [CAL], engine=ENGINE, point_grids=False), fake)
    assert cos_after >= 0.999 and cos_before < 0.99


@pytest.mark.parametrize("points", [None, ["compute_input", "prelu", "residual_add"]])
def test_tensors_without_a_point_are_reobserved_and_reported(points):
    fake = _compress(points)
    stats: dict = {}
    cos_after, _ = _gap(lower(fake, [CAL], engine=ENGINE, stats=stats), fake)
    assert stats["from_model"] == 4 and sorted(stats["reobserved_tensors"]) == ["conv1", "conv2", "fc"]
    assert cos_after >= 0.999


def test_export_report_counts_model_and_reobserved_quantizers(tmp_path):
    result = compress(block_net(), recipe(act_points=POINTS), calibration_data=CAL)
    rep = export_model(result, tmp_path, formats="torch_int8", inputs=CHECK, calibration=[CAL])["torch_int8"]
    assert any(n.startswith("6 of 7 torch.ao activation quantizers use the model's own") for n in rep.notes)
    assert rep.cosine_vs_compressed >= 0.9998
