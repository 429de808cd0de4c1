from pathlib import Path

import pytest
import yaml

from efquant_fx import RecipeError, load_recipe
from efquant_fx.recipe import apply_overrides

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.version == 1 and recipe.name


def test_shipped_recipe_set_covers_the_issue():
    names = {p.stem for p in RECIPES}
    for model in ("arcface_r100", "mobilefacenet"):
        for bits in ("w8a8", "w6a6", "w4a4"):
            assert f"{model}_{bits}" in names
    kinds = [load_recipe(p) for p in RECIPES]
    assert any(r.prune and r.prune.kind != "none" for r in kinds)
    assert any(r.quant and r.finetune is None for r in kinds)  # PTQ only


def test_overrides_are_typed_and_validated():
    r = load_recipe({"quant": {}}, ["quant.weight_bits=4", "quant.exclude=['^fc$']", "quant.batchnorm=keep"])
    assert r.quant.weight_bits == 4 and r.quant.exclude == ["^fc$"] and r.quant.batchnorm == "keep"
    with pytest.raises(RecipeError, match=r"quant.weight_bits: Input should be less than or equal to 8"):
        load_recipe({"quant": {}}, ["quant.weight_bits=9"])
    with pytest.raises(RecipeError, match="expected key.path=value"):
        apply_overrides({}, ["nonsense"])


def test_bad_recipe_one_line_per_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"quant": {"weight_bits": "eight", "observer": "maxmin", "colour": 1},
                                    "calibration": {"images": 0}}))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    lines = err.value.problems
    assert len(lines) == 4
    assert all(line.startswith(f"{path}: ") for line in lines)
    fields = {line.split(": ")[1] for line in lines}
    assert fields == {"quant.weight_bits", "quant.observer", "quant.colour", "calibration.images"}


def test_malformed_yaml_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("quant:\n  weight_bits: [8\n")
    with pytest.raises(RecipeError, match=r"broken.yaml: line \d+, column \d+: malformed YAML"):
        load_recipe(path)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="malformed YAML"):
        load_recipe(path)


def test_resolved_recipe_round_trips_with_stable_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("EFQUANT_SHARED", "/data/shared")
    r = load_recipe({"calibration": {"data": {"kind": "list", "root": "${EFQUANT_SHARED}/x", "list": "l.txt"}}})
    assert r.calibration.data.root == "/data/shared/x"
    saved = r.save(tmp_path / "recipe.yaml")
    again = load_recipe(saved)
    assert again.hash == r.hash
