"""`compress()` itself: which images calibrate and which score the result."""

from __future__ import annotations

import pytest
import torch

import efquant_fx.api as api
from efquant_fx import compress
from tests.conftest import face_batch
from tests.export.test_export import tiny

pytestmark = pytest.mark.filterwarnings("ignore")


def recipe(images: int, batch_size: int) -> dict:
    return {"device": "cpu", "quant": {"weight_bits": 8, "act_bits": 8},
            "calibration": {"images": images, "batch_size": batch_size}}


@pytest.fixture
def seen(monkeypatch):
    """The calibration batches the passes get, to check they never include the scored images."""
    batches: list[torch.Tensor] = []

    def spy(gm, passes, ctx):
        batches[:] = list(ctx.batches)  # the same for every pass
        return run(gm, passes, ctx)

    run = api.run_passes
    monkeypatch.setattr(api, "run_passes", spy)
    return batches


def test_a_single_calibration_batch_is_split_not_scored_on_itself(seen):
    """Issue 16, item 5: with one batch (--set calibration.images=32, batch_size 32) the same images
    calibrated and scored the result, which the CLI called held out."""
    images = face_batch(32, seed=4)
    result = compress(tiny(), recipe(32, 32), calibration_data=images)
    assert [b.shape[0] for b in seen] == [24]
    assert torch.equal(seen[0], images[:24])
    assert result.fidelity["images"] == 8 and result.fidelity["held_out"] is True
    assert any("24 images calibrate, 8 are held out" in n for n in result.notes)


def test_too_few_images_to_hold_out_says_so(seen):
    result = compress(tiny(), recipe(4, 4), calibration_data=face_batch(4, seed=4))
    assert [b.shape[0] for b in seen] == [4]
    assert result.fidelity["images"] == 4 and result.fidelity["held_out"] is False
    assert any(n.startswith("no images were held out: calibration has only 4 image(s)") for n in result.notes)


def test_several_batches_hold_out_the_last_one_as_before(seen):
    images = face_batch(16, seed=4)
    result = compress(tiny(), recipe(16, 8), calibration_data=images)
    assert len(seen) == 1 and torch.equal(seen[0], images[:8])
    assert result.fidelity["images"] == 8 and result.fidelity["held_out"] is True
    assert not any("held out" in n for n in result.notes)


def test_a_zoo_model_without_weights_is_refused_unless_asked_for():
    from efquant_fx.errors import EfquantError

    recipe = {"device": "cpu", "quant": {}, "calibration": {"images": 8, "batch_size": 4, "data": {"kind": "random"}}}
    with pytest.raises(EfquantError, match="model.weights: zoo model 'mobilefacenet' has no trained weights.*"
                                           "random_weights: true"):
        compress("mobilefacenet", recipe)
    result = compress("mobilefacenet", {**recipe, "model": {"random_weights": True}})
    assert result.summary["quantized_layers"] > 0


def test_a_teacher_that_overflows_is_one_error_naming_the_layer():
    from efquant_fx.errors import EfquantError
    from tests.finetune.tiny import TinyFaceNet

    model = TinyFaceNet()
    with torch.no_grad():
        model.body[1][0].weight.fill_(3e38)  # the second block's conv: its output overflows to inf
    with pytest.raises(EfquantError, match=r"not finite: they overflow to inf/NaN at 'body\.1\.0'"):
        compress(model, {"device": "cpu", "quant": {}, "calibration": {"images": 8, "batch_size": 4}},
                 calibration_data=face_batch(8, seed=1))
