"""PReLU range equalization: the float function stays, the 8-bit per-tensor activation error drops."""

import copy

import torch
from torch import nn

from efquant_fx import compress
from efquant_fx.graph.equalize import equalize_prelu_ranges, find_prelu_chains
from efquant_fx.graph.trace import trace


def skewed_net() -> nn.Module:
    """conv -> BN -> PReLU -> depthwise conv -> BN -> PReLU -> 1x1 conv: the first PReLU's channel ranges
    are 1000x apart and the BN after the depthwise conv scales them back (as MobileFaceNet's GDC head does),
    so every channel matters to the embedding."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.PReLU(16),
                        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.PReLU(16),
                        nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 16 * 16, 32))
    with torch.no_grad():
        net[1].weight.copy_(torch.logspace(-3, 0, 16))  # channel c spans 10^-3 .. 1
        net[4].weight.copy_(torch.logspace(3, 0, 16))
    return net.eval()


def images(n: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_chains_are_found_and_the_float_model_is_unchanged():
    gm = trace(copy.deepcopy(skewed_net()))
    chains = find_prelu_chains(gm)
    assert [(c.producer, c.consumer, c.depthwise) for c in chains] == [("1", "3", True), ("4", "6", False)]
    x = images()
    before = gm(x)
    equalize_prelu_ranges(gm, [x], alpha=1.0)
    assert torch.allclose(gm(x), before, rtol=1e-4, atol=1e-5)
    assert gm.get_submodule("1").weight.std() < skewed_net()[1].weight.std()  # small channels scaled up


def test_recipe_switch_lowers_the_w8a8_error():
    recipe = {"device": "cpu", "quant": {"batchnorm": "keep", "observer": "minmax", "act_points": ["prelu"]},
              "calibration": {"images": 8, "batch_size": 8}}
    x = images()
    plain = compress(skewed_net(), recipe, calibration_data=x)
    equalized = compress(skewed_net(), {**recipe, "ptq": {"prelu_equalization": 1.0}}, calibration_data=x)
    teacher = skewed_net()
    with torch.no_grad():
        err = {name: float((r.model(x) - teacher(x)).norm() / teacher(x).norm()) for name, r in
               (("plain", plain), ("equalized", equalized))}
    assert err["equalized"] < 0.5 * err["plain"]
    assert any("PReLU equalization: 2" in n for n in equalized.notes)
