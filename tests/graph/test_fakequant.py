"""The fused training path computes Brevitas's outputs and gradients, and hands the Brevitas forward back."""

import copy

import pytest
import torch

from efquant_fx import compress
from efquant_fx.graph.fakequant import fast_fake_quant
from efquant_fx.graph.modules import ActQuant
from efquant_fx.graph.quantizers import set_act_range
from tests.conftest import face_batch
from tests.finetune.tiny import TinyFaceNet

CAL = face_batch(16, seed=3)
X = face_batch(8, seed=5)


def _student(quant: dict) -> torch.nn.Module:
    return compress(TinyFaceNet(), {"device": "cpu", "quant": quant, "calibration": {"images": 16, "batch_size": 8}},
                    calibration_data=CAL).model


def _grads(model: torch.nn.Module, fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = copy.deepcopy(model).train()
    for p in model.parameters():
        p.requires_grad_(True)
    if fused:
        with fast_fake_quant(model):
            out = model(X)
    else:
        out = model(X)
    (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("quant", [{"weight_bits": 8, "act_bits": 8},
                                   {"weight_bits": 4, "act_bits": 4, "act_symmetric": False}],
                         ids=["w8a8", "w4a4-asym"])
def test_fused_step_matches_brevitas_outputs_and_gradients(quant):
    model = _student(quant)
    out_ref, grads_ref = _grads(model, fused=False)
    out, grads = _grads(model, fused=True)
    assert torch.allclose(out, out_ref, atol=1e-4, rtol=1e-3)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        if name.endswith("weight") and "act_quant" not in name:
            # Brevitas also sends a gradient through each channel's abs-max scale; the fused path does not
            cos = torch.nn.functional.cosine_similarity(g.flatten(), grads_ref[name].flatten(), dim=0)
            assert cos > 0.97, name
        else:  # activation scales, zero points, biases, PReLU slopes
            assert torch.allclose(g, grads_ref[name], atol=1e-4, rtol=1e-2), name
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("symmetric", [True, False])
def test_learnable_point_gradients_equal_brevitas(symmetric):
    point = ActQuant(4, symmetric)
    set_act_range(point.quant, -0.3, 2.0, symmetric)
    x = (torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 1.5).requires_grad_(True)
    g = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    results = []
    for fused in (False, True):
        point.zero_grad()
        x.grad = None
        with fast_fake_quant(point) if fused else torch.enable_grad():
            (point(x) * g).sum().backward()
        results.append((x.grad.clone(), [p.grad.clone() for p in point.parameters()]))
    (gx_ref, gp_ref), (gx, gp) = results
    assert torch.allclose(gx, gx_ref, atol=1e-6)
    for a, b in zip(gp, gp_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-4)


def test_other_weight_quantizers_keep_the_brevitas_forward():
    model = _student({"weight_bits": 4, "act_bits": 8, "weight_estimator": "mse"})
    with fast_fake_quant(model):
        patched = [type(m).__name__ for m in model.modules() if "forward" in vars(m)]
    assert patched and set(patched) == {"ActQuant"}  # MSE weight scales are not the abs-max the fused op uses
