import pytest
import torch
from torch import nn

from efquant_fx import EfquantError, compress, create_model
from efquant_fx.errors import CoverageError
from efquant_fx.graph.modules import ActQuant, QuantPReLU
from efquant_fx.graph.ptq import reestimate_batchnorm
from efquant_fx.graph.quantize import check_coverage, plan_layers, quantize_graph
from efquant_fx.graph.trace import trace
from efquant_fx.models.iresnet import IResNet
from efquant_fx.recipe import QuantConfig
from tests.conftest import face_batch


def calibrated(name: str) -> nn.Module:
    """Random weights, but BN statistics estimated on a batch, so activations have face-net scale."""
    model = create_model(name)
    reestimate_batchnorm(model, [face_batch(8, seed=1)])
    return model


def recipe(bits_w=8, bits_a=8, **quant):
    return {"device": "cpu", "quant": {"weight_bits": bits_w, "act_bits": bits_a, **quant},
            "calibration": {"images": 8, "batch_size": 4}}


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return calibrated("arcface_r18")


def test_w8a8_r18_keeps_embeddings(r18):
    result = compress(r18, recipe())
    assert result.summary["quantized_layers"] == result.summary["compute_layers"] == 22
    assert result.fidelity["cosine_mean"] >= 0.99
    assert 0.24 < result.size_ratio < 0.27  # int8 weights, fp32 BN/PReLU
    assert not any(isinstance(m, nn.PReLU) for m in result.model.modules())


def test_w4a4_is_reported_and_worse_than_w8a8(r18):
    w8 = compress(r18, recipe())
    w4 = compress(r18, recipe(4, 4))
    assert w4.fidelity["cosine_mean"] < w8.fidelity["cosine_mean"]
    assert w4.size_bytes_after < w8.size_bytes_after
    weights = {r["weight_bits"] for r in w4.layers if r["status"] == "quantized"}
    assert weights == {4}


def test_original_model_is_untouched(r18):
    before = {k: v.clone() for k, v in r18.state_dict().items()}
    compress(r18, recipe(4, 4))
    assert all(torch.equal(before[k], v) for k, v in r18.state_dict().items())


def test_per_layer_rules_keep_stem_and_head_at_8_bit(r18):
    result = compress(r18, recipe(4, 4, layers=[{"match": r"^conv1$|^fc$", "weight_bits": 8, "act_bits": 8}],
                                  exclude=[r"downsample"]))
    rows = {r["layer"]: r for r in result.layers}
    assert rows["conv1"]["weight_bits"] == 8 and rows["fc"]["weight_bits"] == 8
    assert rows["layer2.0.conv1"]["weight_bits"] == 4
    assert rows["layer1.0.downsample.0"]["status"] == "float"
    # the stem input is quantized at the stem's 8 bits, not the global 4
    assert result.model.get_submodule("x_act_quant").bits == 8


def test_prelu_slopes_are_kept():
    model = calibrated("arcface_r18")
    with torch.no_grad():
        model.prelu.weight.uniform_(0.1, 0.4)
    result = compress(model, recipe(quantize_prelu_slopes=False))
    qprelu = result.model.get_submodule("prelu")
    assert isinstance(qprelu, QuantPReLU)
    assert torch.equal(qprelu.weight, model.prelu.weight)


def test_activation_points_cover_prelu_and_residual_adds(r18):
    gm = trace(r18)
    quantize_graph(gm, QuantConfig())
    points = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ActQuant)]
    producers = {p.args[0].name for p in points}
    assert any("add" in p for p in producers)  # residual adds
    assert any("prelu" in p for p in producers)


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile", "mse"])
def test_every_observer_calibrates(r18, observer):
    result = compress(r18, recipe(observer=observer))
    assert result.calibration and all(r["observer"] == observer for r in result.calibration)
    assert all(r["range_min"] <= 0 <= r["range_max"] for r in result.calibration)
    assert result.fidelity["cosine_mean"] > 0.98


def test_percentile_clips_tighter_than_minmax(r18):
    mm = compress(r18, recipe(observer="minmax")).calibration
    pc = compress(r18, recipe(observer="percentile", percentile=99.0)).calibration
    widths = lambda rows: sum(r["range_max"] - r["range_min"] for r in rows)  # noqa: E731
    assert widths(pc) < widths(mm)


@pytest.mark.parametrize("options", [
    {"weight_granularity": "per_tensor"}, {"weight_symmetric": False, "act_symmetric": False},
    {"weight_estimator": "mse"}, {"batchnorm": "keep"},
])
def test_quantizer_variants_run(r18, options):
    result = compress(r18, recipe(**options))
    assert result.fidelity["cosine_mean"] > 0.97


def test_batchnorm_reestimate_recovers_teacher_statistics(r18):
    # the teacher's BN statistics came from face_batch(8, seed=1): re-estimating on the same images
    # under quantized weights must land close to them
    x = face_batch(8, seed=1)
    spec = recipe(batchnorm="reestimate") | {"calibration": {"images": 16, "batch_size": 8}}
    result = compress(r18, spec, calibration_data=torch.cat([x, x]))
    assert result.timings["bn_reestimate"] > 0
    assert result.fidelity["cosine_mean"] > 0.97


def test_mobilefacenet_w8a8():
    result = compress(calibrated("mobilefacenet"), recipe())
    assert result.summary["quantized_layers"] == 50
    assert result.fidelity["cosine_mean"] > 0.95


def test_r100_traces_and_quantizes_fully():
    model = create_model("arcface_r100")
    gm = trace(model)
    plans = quantize_graph(gm, QuantConfig(weight_bits=4, act_bits=4))
    assert sum(p.quantize for p in plans.values()) == 104  # 100 3x3 convs... + stem + 4 downsample - 1 + fc
    check_coverage(gm, plans, QuantConfig())


class InsightfaceStyle(IResNet):
    """The original forward wraps the trunk in autocast, which makes torch.export skip it."""

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x.float()))


def test_autocast_wrapper_is_traced_through():
    model = InsightfaceStyle([2, 2, 2, 2]).eval()
    result = compress(model, recipe())
    assert result.summary["quantized_layers"] == 22


def test_coverage_gate_fails_on_unquantized_layer(r18):
    gm = trace(r18)
    cfg = QuantConfig()
    plans = quantize_graph(gm, cfg)
    from efquant_fx.graph.quantize import set_module

    set_module(gm, "layer3.1.conv2", nn.Conv2d(256, 256, 3, padding=1, bias=False))
    with pytest.raises(CoverageError, match="layer3.1.conv2"):
        check_coverage(gm, plans, cfg)


class Dynamic(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


class WithDynamic(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gate = Dynamic()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.gate(self.conv(x)).mean((2, 3)))


def test_untraceable_module_named_with_fix():
    with pytest.raises(EfquantError, match=r"module 'gate' \(Dynamic\).*leaf_modules: \['gate'\]"):
        trace(WithDynamic(), auto_leaf=False)
    gm = trace(WithDynamic(), leaf_modules=["gate"])
    assert any(n.target == "gate" for n in gm.graph.nodes)


class PatchEmbed(nn.Module):
    """insightface vit's patch embedding: a shape assert torch.fx cannot trace, around a conv."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 16, stride=16)

    def forward(self, x):
        _b, _c, h, w = x.shape
        assert h == 112 and w == 112, "input size"
        return self.proj(x).flatten(2).transpose(1, 2)


class TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed()
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        t = self.patch_embed(x)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        attn = (q @ k.transpose(1, 2)).softmax(-1)
        return self.head((attn @ v).mean(1))


def test_a_module_that_does_not_trace_becomes_a_leaf_and_says_so():
    from efquant_fx import compress

    model = TinyViT().eval()
    x = torch.rand(2, 3, 112, 112)
    result = compress(model, {"device": "cpu", "quant": {}, "calibration": {"images": 8, "batch_size": 4}},
                      calibration_data=torch.rand(8, 3, 112, 112) * 2 - 1)
    note = next(n for n in result.notes if n.startswith("torch.fx could not trace"))
    assert "'patch_embed' (PatchEmbed: TraceError" in note
    assert {r["layer"] for r in result.layers if r["status"] == "quantized"} == {"qkv", "head"}
    coverage = next(n for n in result.notes if n.startswith("op coverage"))
    assert "linear 2/2" in coverage and "opaque module 0/1" in coverage and "matmul 0/2" in coverage
    assert "softmax 0/1" in coverage
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(result.model(x), model(x)).min() > 0.9


def test_plan_reports_exclusions():
    gm = trace(create_model("mobilefacenet"))
    plans = plan_layers(gm, QuantConfig(exclude=["^features"], layer_types=["Conv2d"]))
    assert plans["features.layers.2"].reason == "Linear not in quant.layer_types"
    assert not plans["features.layers.0.layers.0"].quantize


class ConvBNNet(nn.Module):
    """conv->BN->PReLU, then a conv whose output goes straight into a residual add."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=4, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.prelu = nn.PReLU(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        return x + self.conv2(x)


def _user_types(gm, target: str) -> list[type]:
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == target)
    return [type(gm.get_submodule(u.target)) for u in node.users if u.op == "call_module"]


@pytest.mark.parametrize("batchnorm", ["keep", "fold"])
def test_compute_output_quantizes_what_an_int8_conv_writes(batchnorm):
    """The point sits past the BatchNorm when it is kept: that is the tensor a QLinearConv (BN folded) writes."""
    cfg = QuantConfig(act_points=["compute_input", "compute_output", "prelu", "residual_add"], batchnorm=batchnorm)
    gm = trace(ConvBNNet().eval())
    if batchnorm == "fold":
        from efquant_fx.graph.ptq import fold_batchnorm

        gm = fold_batchnorm(gm)
    quantize_graph(gm, cfg)
    after_conv1 = _user_types(gm, "bn1" if batchnorm == "keep" else "conv1")
    assert after_conv1 == [ActQuant]
    if batchnorm == "keep":
        assert _user_types(gm, "conv1") == [nn.BatchNorm2d]  # nothing between conv and its BN
    assert _user_types(gm, "conv2") == [ActQuant]
    without = trace(ConvBNNet().eval())
    quantize_graph(without, QuantConfig(batchnorm="keep"))
    n_with = sum(isinstance(m, ActQuant) for m in gm.modules())
    n_without = sum(isinstance(m, ActQuant) for m in without.modules())
    assert n_with == n_without + 2


def test_role_selectors_transfer_between_backbones():
    """One rule list keeps the stem, the depthwise convs and the embedding at 8 bit on two mobilefacenet
    layouts whose module names share nothing."""
    from efquant_fx.graph.quantize import layer_roles

    rules = [{"role": "stem", "weight_bits": 8}, {"role": "depthwise", "weight_bits": 8},
             {"role": "embedding", "weight_bits": 8}]
    cfg = QuantConfig(weight_bits=4, layers=rules)
    gm = trace(create_model("mobilefacenet"))
    plans = plan_layers(gm, cfg)
    roles = layer_roles(gm)
    eight = {n for n, p in plans.items() if p.weight_bits == 8}
    assert eight == {n for n, r in roles.items() if r & {"stem", "depthwise", "embedding"}}
    assert len([n for n, r in roles.items() if "depthwise" in r]) == 16  # 15 block convs and the 7x7 GDC head
    assert "depthwise" in roles["features.layers.0.layers.0"]
    assert plans[next(iter(plans))].reason == "quant.layers role stem"


def test_a_rule_that_selects_nothing_is_an_error():
    cfg = QuantConfig(weight_bits=4, layers=[{"match": r"^conv_1_conv2d$", "weight_bits": 8}])
    with pytest.raises(EfquantError, match=r"quant.layers\[0\]: '\^conv_1_conv2d\$' selects none of the model's 50"):
        plan_layers(trace(create_model("mobilefacenet")), cfg)
