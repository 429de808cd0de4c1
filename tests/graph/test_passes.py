"""The graph rewrite as a list of passes: what a recipe builds, and replay without data."""

import copy

import torch
from torch import nn

from efquant_fx.graph.modules import ActQuant
from efquant_fx.graph.passes import (
    GPTQ,
    BiasCorrection,
    Calibrate,
    CrossLayerEqualization,
    FoldBatchNorm,
    GraphPass,
    InsertQuantizers,
    PassContext,
    PruneUnstructured,
    ReestimateBatchNorm,
    build_passes,
    replay_passes,
    run_passes,
)
from efquant_fx.graph.trace import trace
from efquant_fx.recipe import load_recipe


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.PReLU(8), nn.Conv2d(8, 8, 3, 2, 1),
                         nn.BatchNorm2d(8), nn.PReLU(8), nn.Flatten(), nn.Linear(8 * 8 * 8, 16)).eval()


def kinds(passes: list[GraphPass]) -> list[type]:
    return [type(p) for p in passes]


def test_a_recipe_builds_its_passes_in_pipeline_order():
    recipe = load_recipe({"prune": {"kind": "unstructured", "sparsity": 0.2},
                          "quant": {"batchnorm": "reestimate"},
                          "ptq": {"cross_layer_equalization": 2, "gptq": True, "bias_correction": True}})
    assert kinds(build_passes(recipe)) == [PruneUnstructured, CrossLayerEqualization, InsertQuantizers,
                                           ReestimateBatchNorm, Calibrate, GPTQ, BiasCorrection]
    assert kinds(build_passes(load_recipe({"quant": {}}))) == [FoldBatchNorm, InsertQuantizers, Calibrate]
    assert build_passes(load_recipe({"quant": {"enabled": False}})) == []


def test_run_passes_calibrates_and_times_each_pass():
    recipe = load_recipe({"quant": {}})
    ctx = PassContext(batches=[torch.rand(4, 3, 32, 32) * 2 - 1])
    gm = run_passes(trace(tiny()), build_passes(recipe), ctx)
    assert set(ctx.timings) == {"fold_batchnorm", "quantize", "calibrate"}
    assert ctx.calibration and all(row["point"] for row in ctx.calibration)
    assert ctx.plans and all(p.quantize for p in ctx.plans.values())
    assert any(isinstance(m, ActQuant) for m in gm.modules())


def test_replay_skips_data_passes_and_gives_the_same_state_dict_keys():
    recipe = load_recipe({"quant": {}, "ptq": {"bias_correction": True}})
    ctx = PassContext(batches=[torch.rand(4, 3, 32, 32) * 2 - 1])
    calibrated = run_passes(trace(tiny()), build_passes(recipe), ctx)
    replayed, plans = replay_passes(trace(tiny()), recipe)
    assert "bias_correction" in ctx.timings
    assert set(plans) == set(ctx.plans)
    # bias correction adds biases the replayed graph has none of yet: the reloader adopts them from the state
    assert set(replayed.state_dict()) <= set(calibrated.state_dict())


def test_a_custom_pass_joins_the_list():
    class Double(GraphPass):
        name = "double"

        def apply(self, gm, ctx):
            gm.get_submodule("0").weight.data *= 2
            return gm

    model = tiny()
    gm = run_passes(trace(copy.deepcopy(model)), [Double()], PassContext())
    assert torch.equal(gm.get_submodule("0").weight, 2 * model[0].weight)
