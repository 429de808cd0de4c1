"""Global magnitude pruning and torch-pruning channel pruning on arcface_r18 and MobileFaceNet."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
from torch import nn

from efquant_fx.errors import EfquantError
from efquant_fx.graph.prune import (
    count_params,
    make_pruning_permanent,
    prune_channels,
    prune_unstructured,
    sparsity_report,
    summarize,
)
from efquant_fx.models import create_model

MODELS = ["arcface_r18", "mobilefacenet"]
# The embedding layer of each model, anchored so that it matches that module only.
EMBEDDING = {"arcface_r18": "^fc$", "mobilefacenet": r"^features\.layers\.2$"}


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 3, 112, 112)


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _zeros(modules) -> tuple[int, int]:
    ws = [m.weight_orig.detach() * m.weight_mask if hasattr(m, "weight_mask") else m.weight for m in modules]
    return sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws)


# ------------------------------------------------------------------------------------ unstructured


@pytest.mark.parametrize("name", MODELS)
def test_global_sparsity_reached(name):
    torch.manual_seed(0)
    model = create_model(name)
    infos = prune_unstructured(model, 0.4)
    zeros, total = _zeros(_layers(model).values())
    assert abs(zeros / total - 0.4) < 0.01
    assert summarize(infos)["sparsity"] == pytest.approx(zeros / total)
    assert {i.name for i in infos} == set(_layers(model))
    report = sparsity_report(model)
    assert report.keys() == _layers(model).keys() and max(report.values()) > 0.4 > min(report.values())


def test_excluded_layers_untouched_and_target_counts_only_the_rest():
    torch.manual_seed(0)
    model = create_model("mobilefacenet")
    before = {n: m.weight.detach().clone() for n, m in _layers(model).items()}
    infos = prune_unstructured(model, 0.5, exclude=[r"^features\.", r"^layers\.0\."])
    layers = _layers(model)
    kept = [n for n in layers if n.startswith(("features.", "layers.0."))]
    assert kept == ["layers.0.layers.0", "features.layers.0.layers.0", "features.layers.2"]
    for n in kept:
        assert not hasattr(layers[n], "weight_mask") and torch.equal(layers[n].weight, before[n])
    assert {i.name for i in infos if i.excluded} == set(kept)
    zeros, total = _zeros(m for n, m in layers.items() if n not in kept)
    assert abs(zeros / total - 0.5) < 0.01


def test_second_call_prunes_to_the_new_target():
    model = create_model("mobilefacenet")
    prune_unstructured(model, 0.3)
    prune_unstructured(model, 0.6)
    prune_unstructured(model, 0.2)  # lower target: masks stay
    zeros, total = _zeros(_layers(model).values())
    assert abs(zeros / total - 0.6) < 0.01


def test_masks_keep_zeros_through_an_sgd_step(x):
    model = create_model("mobilefacenet").train()
    prune_unstructured(model, 0.5)
    masks = {n: m.weight_mask.clone() for n, m in _layers(model).items()}
    orig = {n: m.weight_orig.detach().clone() for n, m in _layers(model).items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model(x).pow(2).mean().backward()
    opt.step()
    model(x)  # refreshes module.weight from weight_orig * mask
    changed = 0
    for n, m in _layers(model).items():
        assert torch.all(m.weight[masks[n] == 0] == 0), n
        changed += int(not torch.equal(m.weight_orig, orig[n]))
    assert changed > 0


def test_make_pruning_permanent_leaves_zeros_and_plain_keys():
    model = create_model("mobilefacenet")
    prune_unstructured(model, 0.5)
    zeros, _ = _zeros(_layers(model).values())
    assert any(k.endswith("weight_mask") for k in model.state_dict())
    done = make_pruning_permanent(model)
    assert len(done) == len(_layers(model))
    keys = model.state_dict().keys()
    assert not any(k.endswith(("_orig", "_mask")) for k in keys)
    assert _zeros(_layers(model).values())[0] == zeros
    fresh = create_model("mobilefacenet")
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert make_pruning_permanent(model) == []


def test_keep_masks_false_is_permanent_at_once():
    model = create_model("mobilefacenet")
    prune_unstructured(model, 0.3, keep_masks=False)
    assert not any(k.endswith("_mask") for k in model.state_dict())
    zeros, total = _zeros(_layers(model).values())
    assert abs(zeros / total - 0.3) < 0.01


@pytest.mark.parametrize("bad", [1.0, 1.2, -0.1, float("nan"), "0.5", True])
def test_bad_sparsity(bad):
    with pytest.raises(EfquantError, match="sparsity"):
        prune_unstructured(nn.Linear(4, 4), bad)


def test_bad_exclude_patterns():
    model = create_model("mobilefacenet")
    with pytest.raises(EfquantError, match="exclude.*invalid regular expression"):
        prune_unstructured(model, 0.5, exclude=["layers.("])
    with pytest.raises(EfquantError, match="exclude.*matches no module"):
        prune_unstructured(model, 0.5, exclude=["^nosuchlayer$"])
    with pytest.raises(EfquantError, match="no layer left"):
        prune_unstructured(model, 0.5, exclude=["."])


# -------------------------------------------------------------------------------------- structured


@pytest.mark.parametrize("name", MODELS)
def test_channel_pruning_shrinks_and_keeps_io(name, x):
    model = create_model(name)
    n0 = count_params(model)
    widths0 = {n: (m.weight.shape[0], m.weight.shape[1]) for n, m in _layers(model).items()}
    prelu0 = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.PReLU))
    infos = prune_channels(model, 0.3, x)
    n1 = count_params(model)
    assert n1 < 0.7 * n0
    assert model(x).shape == (2, 512)
    layers = _layers(model)
    first = next(iter(layers.values()))
    assert first.in_channels == 3
    narrower = [n for n, m in layers.items() if m.weight.shape[0] < widths0[n][0]]
    assert len(narrower) >= len(layers) - 1  # all but the embedding layer
    for m in model.modules():  # BN and PReLU follow the convs
        if isinstance(m, nn.BatchNorm2d):
            assert m.weight.numel() == m.running_mean.numel() == m.num_features
    assert sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.PReLU)) < 0.75 * prelu0
    info = {i.name: i for i in infos}
    emb = next(i for i in infos if i.excluded)
    assert emb.out_after == emb.out_before == 512 and emb.in_after < emb.in_before
    assert info[next(iter(layers))].in_after == 3
    assert summarize(infos)["params"] == sum(m.weight.numel() for m in layers.values())

    gm = fx.symbolic_trace(model)
    model.eval()
    gm.eval()
    torch.testing.assert_close(gm(x), model(x))


def _randomize(model: nn.Module) -> None:
    """Distinct BN statistics (they identify surviving channels) and non-trivial PReLU slopes."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn_like(m.running_mean))
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
                m.weight.copy_(torch.rand_like(m.weight) + 0.5)
                m.bias.copy_(torch.randn_like(m.bias))
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand_like(m.weight))


@pytest.mark.parametrize("name", MODELS)
def test_pruned_model_equals_original_with_removed_channels_silenced(name, x):
    """Pruning is exact: silencing the removed channels (BN gamma = beta = 0) in the original gives
    the same output. This checks the residual coupling, flatten->fc columns and grouped convs."""
    torch.manual_seed(1)
    ref = create_model(name)
    _randomize(ref)
    pruned = copy.deepcopy(ref)
    prune_channels(pruned, 0.3, x)
    bns = {n: m for n, m in pruned.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    with torch.no_grad():
        for n, bn in ref.named_modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                kept = [int((bn.running_mean == v).nonzero()) for v in bns[n].running_mean]
                assert kept == sorted(kept)
                removed = sorted(set(range(bn.num_features)) - set(kept))
                bn.weight[removed] = 0
                bn.bias[removed] = 0
    a, b = ref.eval()(x), pruned.eval()(x)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_graph_module_is_pruned_and_output_kept(x):
    gm = fx.symbolic_trace(create_model("mobilefacenet"))
    n0 = count_params(gm)
    gm.train()
    head_bn = gm.get_submodule("features.layers.3")  # embedding BN: not pruned
    stats = head_bn.running_mean.clone()
    prune_channels(gm, 0.3, x)
    assert count_params(gm) < 0.7 * n0
    assert gm.training and head_bn.training  # modes restored
    assert torch.equal(head_bn.running_mean, stats)  # the tracing forwards ran in eval mode
    assert gm.eval()(x).shape == (2, 512)


def test_excluded_layer_keeps_its_width(x):
    model = create_model("arcface_r18")
    infos = {i.name: i for i in prune_channels(model, 0.3, x, exclude=[r"^layer2\.1\.conv2$"])}
    assert infos["layer2.1.conv2"].excluded and infos["layer2.1.conv2"].out_after == 128
    # The residual add couples the whole stage: its stream stays 128 wide, inner convs still shrink.
    assert model.layer2[0].conv2.out_channels == model.layer2[0].downsample[0].out_channels == 128
    assert model.layer2[1].conv1.in_channels == 128 and model.layer2[1].conv1.out_channels < 128
    assert model.layer3[0].conv1.out_channels < 256
    assert model(x).shape == (2, 512)


def test_grouped_conv_is_pruned_in_whole_slots(x):
    model = create_model("mobilefacenet")
    infos = {i.name: i for i in prune_channels(model, 0.3, x)}
    conv = model.layers[1].layers[0]
    assert conv.groups == 64 and conv.in_channels == conv.out_channels == 64
    assert infos["layers.0.layers.0"].out_after == 64
    model = create_model("mobilefacenet")
    infos = {i.name: i for i in prune_channels(model, 0.3, x, exclude=[r"^layers\.[01]\."])}
    assert infos["layers.1.layers.0"].out_after == infos["layers.0.layers.0"].out_after == 128
    assert infos["layers.2.layers.0.layers.0"].out_after < 128


def test_round_to(x):
    model = create_model("mobilefacenet")
    infos = prune_channels(model, 0.3, x, round_to=8)
    assert all(i.out_after % 8 == 0 for i in infos)
    assert model(x).shape == (2, 512)
    # 128 * 0.1 = 12 rounds down to 0: the layer keeps round_to channels instead of staying whole.
    model = create_model("mobilefacenet")
    infos = {i.name: i for i in prune_channels(model, 0.9, x, round_to=64)}
    assert infos["layers.2.layers.0.layers.0"].out_after == infos["conv_sep.layers.0"].out_after == 64


@pytest.mark.parametrize("bad", [1.2, -0.1, 1.0])
def test_bad_ratio(bad, x):
    with pytest.raises(EfquantError, match="ratio"):
        prune_channels(create_model("mobilefacenet"), bad, x)


def test_bad_structured_arguments(x):
    model = create_model("mobilefacenet")
    with pytest.raises(EfquantError, match="importance"):
        prune_channels(model, 0.3, x, importance="taylor")
    with pytest.raises(EfquantError, match="round_to"):
        prune_channels(model, 0.3, x, round_to=0)
    with pytest.raises(EfquantError, match="example_input.*does not run"):
        prune_channels(model, 0.3, torch.randn(2, 3, 64, 64))
    prune_unstructured(model, 0.2)
    with pytest.raises(EfquantError, match="make_pruning_permanent"):
        prune_channels(model, 0.3, x)


def test_reported_size_of_a_masked_model_is_its_dense_size():
    """Masks are bookkeeping: a 50 %-pruned model is reported at its dense size, not twice it."""
    from efquant_fx.graph.report import compressed_size_bytes

    model = create_model("mobilefacenet")
    dense = compressed_size_bytes(model)
    prune_unstructured(model, 0.5)
    assert any(name.endswith("_mask") for name, _ in model.named_buffers())
    assert compressed_size_bytes(model) == dense
