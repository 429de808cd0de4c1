"""quant.budget raises the layers that matter most, stays within its averages, and reloads exactly."""

import pytest
import torch

from efquant_fx import compress, load_result
from efquant_fx.errors import EfquantError
from efquant_fx.graph.budget import average_bits, layer_costs
from efquant_fx.recipe import load_recipe
from tests.conftest import face_batch
from tests.finetune.tiny import TinyFaceNet

CAL = face_batch(32, seed=3)
X = face_batch(4, seed=9)


def _recipe(budget: dict | None) -> dict:
    quant = {"weight_bits": 4, "act_bits": 4, **({"budget": budget} if budget else {})}
    return {"device": "cpu", "quant": quant, "calibration": {"images": 32, "batch_size": 16}}


@pytest.fixture(scope="module")
def budgeted():
    torch.manual_seed(0)
    return compress(TinyFaceNet(), _recipe({"weight_bits": 5.0, "act_bits": 5.0, "images": 16}),
                    calibration_data=CAL)


def test_budget_raises_layers_within_the_averages_and_improves_fidelity(budgeted):
    torch.manual_seed(0)
    uniform = compress(TinyFaceNet(), _recipe(None), calibration_data=CAL)
    bits = average_bits(layer_costs(budgeted.model, X))
    assert 4.0 < bits["avg_weight_bits"] <= 5.0 and 4.0 < bits["avg_act_bits"] <= 5.0
    assert any(row["weight_bits"] == 8 for row in budgeted.layers if row["status"] == "quantized")
    assert budgeted.fidelity["cosine_mean"] > uniform.fidelity["cosine_mean"]
    assert any(n.startswith("bit budget:") for n in budgeted.notes)


def test_saved_recipe_names_the_raised_layers_and_reloads_the_same_graph(budgeted, tmp_path):
    assert budgeted.recipe.quant.budget is None  # resolved: the rules are what a reload needs
    assert budgeted.recipe.quant.layers and all(r.match.startswith("^") for r in budgeted.recipe.quant.layers)
    budgeted.save(tmp_path / "run")
    back = load_result(tmp_path / "run", model=TinyFaceNet())
    with torch.no_grad():
        assert torch.allclose(back.model(X), budgeted.model(X), atol=1e-5)


@pytest.mark.parametrize("budget, message", [({"high_bits": 8}, "give weight_bits, act_bits"),
                                             ({"weight_bits": 3.0}, "below quant.weight_bits")])
def test_an_unreachable_or_empty_budget_is_a_recipe_error(budget, message):
    with pytest.raises(EfquantError, match=message):
        load_recipe(_recipe(budget))
