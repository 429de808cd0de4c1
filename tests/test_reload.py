"""`load_result`: a saved run directory comes back as the same compressed model, or a one-line error."""

from __future__ import annotations

import shutil

import pytest
import torch

from efquant_fx import EfquantError, compress, load_result
from tests.conftest import face_batch
from tests.export.test_export import TinyNet, tiny

pytestmark = pytest.mark.filterwarnings("ignore")

CAL = face_batch(16, seed=2)
X = face_batch(4, seed=9)


def tiny_recipe(**sections) -> dict:
    recipe = {"device": "cpu", "quant": {"weight_bits": 8, "act_bits": 8},
              "calibration": {"images": 16, "batch_size": 8}}
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


@pytest.fixture(scope="module")
def mbf_run(tmp_path_factory):
    """mobilefacenet by zoo name (random init, seeded by compress), random calibration, saved."""
    recipe = {"model": {"name": "mobilefacenet", "random_weights": True}, "device": "cpu",
              "quant": {"weight_bits": 4, "act_bits": 8},
              "calibration": {"images": 8, "batch_size": 4}}
    result = compress("mobilefacenet", recipe)
    out = tmp_path_factory.mktemp("mbf_run")
    result.save(out)
    return result, out


def test_reload_by_model_name_gives_the_same_model_and_teacher(mbf_run):
    result, run = mbf_run
    back = load_result(run)
    with torch.no_grad():
        assert torch.allclose(back.model(X), result.model(X), atol=1e-6)
        assert torch.equal(back.model(X), result.model(X))
        assert torch.equal(back.teacher(X), result.teacher(X))  # same seeded init as compress()
    assert back.summary == result.summary
    assert back.size_bytes_after == result.size_bytes_after and back.size_bytes_before == result.size_bytes_before
    assert back.fidelity == result.fidelity and back.recipe.hash == result.recipe.hash
    assert any("rebuilt without weights" in n for n in back.notes)  # says the teacher is not pretrained
    ranges = [r for r in back.layers if r["type"] == "ActQuant"]
    assert ranges and all(r["reason"].startswith("range ") for r in ranges)  # from compression.json


def test_reload_of_a_pretrained_zoo_model_does_not_say_random_weights(tmp_path):
    """SFace loads its own pretrained weights: 'rebuilt without weights' was a false note (issue 16, item 1)."""
    recipe = {"model": {"name": "sface"}, "device": "cpu", "quant": {"weight_bits": 8, "act_bits": 8},
              "calibration": {"images": 4, "batch_size": 4}}
    compress("sface", recipe).save(tmp_path)
    back = load_result(tmp_path)
    assert not any("without weights" in n for n in back.notes), back.notes


@pytest.mark.parametrize("sections", [
    {"ptq": {"cross_layer_equalization": 2, "act_equalization": 0.5, "bias_correction": True}},
    {"quant": {"weight_bits": 4, "weight_estimator": "mse", "weight_symmetric": False, "act_symmetric": False}},
    {"prune": {"kind": "channels", "sparsity": 0.5}},
    {"prune": {"kind": "unstructured", "sparsity": 0.5}, "quant": {"batchnorm": "keep"}},
    {"prune": {"kind": "unstructured", "sparsity": 0.5}, "quant": {"enabled": False}},
    {"quant": {"weight_bits": 4}, "ptq": {"prelu_equalization": 1.0, "learned_rounding": {"iters": 5}}},
], ids=["cle-acteq-biascorr", "mse-asym-w4", "channels", "unstructured", "prune-only", "preluEq-rounding-w4"])
def test_reload_replays_every_structural_step(tmp_path, sections):
    """Biases created by bias correction, lazy MSE scales, pruned widths and masks all reload strictly."""
    result = compress(tiny(), tiny_recipe(**sections), calibration_data=CAL)
    result.save(tmp_path)
    back = load_result(tmp_path, model=TinyNet())
    with torch.no_grad():
        assert torch.equal(back.model(X), result.model(X))
    assert back.summary == result.summary


def test_reload_after_finetune(tmp_path):
    """Fine-tuning (with observers re-opened for a step) moves values, never the graph's shape."""
    recipe = tiny_recipe(quant={"weight_bits": 4, "act_bits": 4},
                         finetune={"data": {"kind": "random", "n": 16}, "steps": 2, "identities_per_batch": 2,
                                   "images_per_identity": 2, "calibrate_steps": 1, "amp": False})
    result = compress(tiny(), recipe, calibration_data=CAL, finetune_dir=tmp_path)
    result.save(tmp_path)
    back = load_result(tmp_path, model=TinyNet())
    with torch.no_grad():
        assert torch.equal(back.model(X), result.model(X))
    assert result.history and back.history == result.history and back.ptq_fidelity == result.ptq_fidelity


# --- errors: one line naming the file --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    compress(tiny(), tiny_recipe(), calibration_data=CAL).save(out)
    return out


def broken(tiny_run, tmp_path, fname: str, content: bytes | None):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    if content is None:
        (run / fname).unlink()
    else:
        (run / fname).write_bytes(content)
    return run


@pytest.mark.parametrize(("fname", "content", "message"), [
    ("model.pt", None, "run: this run did not finish: no model.pt; rerun efquant-fx apply"),
    ("model.pt", b"hello", "model.pt: not a torch.save() state dict"),
    ("recipe.yaml", None, "no recipe.yaml: not a run directory"),
    ("recipe.yaml", b"quant: [\n", "recipe.yaml: line 2, column 1: malformed YAML"),
    ("recipe.yaml", b"quant: {weight_bits: eight}\n", "recipe.yaml: quant.weight_bits: Input should be a valid"),
    ("compression.json", b"{", "compression.json: not a readable report"),
])
def test_bad_files_are_one_line_errors(tiny_run, tmp_path, fname, content, message):
    run = broken(tiny_run, tmp_path, fname, content)
    with pytest.raises(EfquantError) as info:
        load_result(run, model=TinyNet())
    assert message in str(info.value) and "\n" not in str(info.value)


def test_truncated_and_pickled_state_dicts_are_refused(tiny_run, tmp_path):
    data = (tiny_run / "model.pt").read_bytes()
    run = broken(tiny_run, tmp_path, "model.pt", data[: len(data) // 2])
    with pytest.raises(EfquantError, match=r"model\.pt: "):  # wording is read_state_dict's
        load_result(run, model=TinyNet())

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"conv1.weight": Payload()}, run / "model.pt")
    with pytest.raises(EfquantError, match="model.pt"):
        load_result(run, model=TinyNet())


def test_state_dict_that_does_not_fit(tiny_run, tmp_path):
    run = broken(tiny_run, tmp_path, "model.pt", None)
    state = torch.load(tiny_run / "model.pt", weights_only=True)
    state["conv1.weight"] = torch.zeros(4, 3, 3, 3)
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, run / "model.pt")
    with pytest.raises(EfquantError) as info:
        load_result(run, model=TinyNet())
    msg = str(info.value)
    assert msg.startswith(f"{run / 'model.pt'}: does not fit") and "extra.weight" in msg and "conv1.weight" in msg
    with pytest.raises(EfquantError, match="does not fit"):  # another architecture
        load_result(tiny_run, model="mobilefacenet")


def test_run_of_a_python_module_needs_the_model(tiny_run, tmp_path):
    with pytest.raises(EfquantError, match=r"recipe.yaml: model.name: .*pass model="):
        load_result(tiny_run)
    with pytest.raises(EfquantError, match="run directory not found"):
        load_result(tmp_path / "missing")
