import time
from pathlib import Path

import pytest
import yaml

from efquant_fx import RecipeError, load_recipe
from efquant_fx.recipe import apply_overrides

RECIPES = sorted((Path(__file__).resolve().parents[1] / "efquant_fx" / "recipes").rglob("*.yaml"))  # bench/ too


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


# --- issue 8: hostile YAML, overrides that do not fit the recipe's shape, empty keys --------------------


def laughs(levels: int = 9, width: int = 9) -> str:
    """A "billion laughs" document: ``levels`` anchors, each a list of ``width`` aliases of the one before."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "name: laughs\nmodel:\n  kwargs:\n" + "".join(f"    {line}\n" for line in lines)


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(laughs())  # ~550 bytes that expand to 9**9 strings
    assert path.stat().st_size < 600
    t0 = time.perf_counter()
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert time.perf_counter() - t0 < 2
    assert err.value.problems == [f"{path}: line 5, column 14: aliases (*l0, ...) expand the recipe to more than "
                                  "100,000 values and characters (an alias bomb?); write the repeated values out"]


def test_a_merge_key_bomb_is_refused(tmp_path):
    lines = ["a0: &a0 {x: 1, y: 2}"] + [f"a{i}: &a{i} {{<<: [{', '.join([f'*a{i - 1}'] * 9)}]}}" for i in range(1, 9)]
    path = tmp_path / "merge.yaml"
    path.write_text("model:\n  kwargs:\n" + "".join(f"    {line}\n" for line in lines))
    with pytest.raises(RecipeError, match=r"merge.yaml: line \d+, column \d+: aliases \(\*a0, \.\.\.\) expand"):
        load_recipe(path)


def test_a_recursive_or_deep_recipe_is_one_line_not_a_recursion_error(tmp_path):
    cyclic = tmp_path / "cyclic.yaml"
    cyclic.write_text("model:\n  kwargs:\n    a: &a [*a]\n")
    with pytest.raises(RecipeError, match=r"cyclic.yaml: line 3, column 12: an alias refers to a node that "
                                          r"contains it \(\*a or another\); a recipe cannot be recursive"):
        load_recipe(cyclic)
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(RecipeError, match=r"deep.yaml: line 1, column 56: nested more than 50 levels deep"):
        load_recipe(deep)
    # aliases that only nest deeply once expanded (each anchor is 20 levels, the next wraps the last)
    chain = ["a0: &a0 " + "[" * 20 + "]" * 20] + [f"a{i}: &a{i} " + "[" * 20 + f"*a{i - 1}" + "]" * 20
                                                  for i in range(1, 4)]
    deep.write_text("model:\n  kwargs:\n" + "".join(f"    {line}\n" for line in chain))
    with pytest.raises(RecipeError, match=r"aliases \(\*a0, \.\.\.\) nest the recipe more than 50 levels deep"):
        load_recipe(deep)


def test_modest_aliases_still_work(tmp_path):
    path = tmp_path / "shared.yaml"
    path.write_text("calibration:\n  data: &faces {kind: folder, root: my/faces, max_images: 64}\n"
                    "finetune:\n  data: *faces\n")
    r = load_recipe(path)
    assert r.calibration.data == r.finetune.data and r.finetune.data.root == "my/faces"
    nested = "model:\n  kwargs:\n    a: " + "[" * 40 + "]" * 40 + "\n"  # 40 levels (+2): still fine
    path.write_text(nested)
    assert load_recipe(path).model.kwargs["a"]


def test_set_values_use_the_same_limits():
    bomb = "[" + ", ".join(["&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
        f"&{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcde", "bcdef", strict=True)]) + "]"
    with pytest.raises(RecipeError) as err:
        load_recipe({}, [f"model.kwargs.x={bomb}"])
    assert err.value.problems == ["--set: model.kwargs.x: value refused: aliases (*a, ...) expand the recipe to "
                                  "more than 100,000 values and characters (an alias bomb?); write the repeated "
                                  "values out"]
    with pytest.raises(RecipeError, match=r"--set: model.kwargs.x: value refused: an alias refers to a node"):
        load_recipe({}, ["model.kwargs.x=&a [*a]"])
    assert load_recipe({}, ["model.kwargs.x=[unclosed"]).model.kwargs["x"] == "[unclosed"  # as before: a string


BASE_FOR_SET = {"quant": {"exclude": ["^fc$", "conv1"], "weight_bits": 4}, "finetune": None,
                "eval": [None, {"name": "lfw_bin", "path": "a.bin"}]}


@pytest.mark.parametrize("override, expected", [
    ("quant.exclude.x=1", "--set: quant.exclude.x: quant.exclude is a list of 2 items: address its items by "
                          "index 0 to 1, not 'x'"),
    ("quant.exclude.7=1", "--set: quant.exclude.7: quant.exclude is a list of 2 items: address its items by "
                          "index 0 to 1, not '7'"),
    ("quant.exclude.-1=1", "--set: quant.exclude.-1: quant.exclude is a list of 2 items: address its items by "
                           "index 0 to 1, not '-1'"),
    ("quant.exclude.²=1", "--set: quant.exclude.²: quant.exclude is a list of 2 items: address its items by "
                          "index 0 to 1, not '²'"),
    ("quant.exclude.0.x=1", "--set: quant.exclude.0.x: quant.exclude.0 is a value ('^fc$'), not a mapping"),
    ("quant.weight_bits.x=1", "--set: quant.weight_bits.x: quant.weight_bits is a value (4), not a mapping"),
    ("quant.weight_bits.x.y=1", "--set: quant.weight_bits.x.y: quant.weight_bits is a value (4), not a mapping"),
    ("quant.layers.0.match=x", "--set: quant.layers.0.match: quant.layers is a list of 0 items: address its "
                               "items by index, but it is empty, not '0'"),
    ("quant..x=1", "--set: quant..x: empty part in the key path (expected a.b.c=value)"),
])
def test_an_override_that_does_not_fit_the_recipe_is_one_line(override, expected):
    data = {**BASE_FOR_SET, "quant": {**BASE_FOR_SET["quant"], "layers": []}}
    with pytest.raises(RecipeError) as err:
        apply_overrides(data, [override])
    assert err.value.problems == [expected]


def test_overrides_into_null_sections_and_list_items():
    out = apply_overrides(BASE_FOR_SET, ["finetune.steps=3", "eval.0.name=lfw_bin", "eval.1.path=b.bin",
                                         "quant.exclude.1=layer1", "prune.kind=channels"])
    assert out["finetune"] == {"steps": 3} and out["prune"] == {"kind": "channels"}
    assert out["eval"] == [{"name": "lfw_bin"}, {"name": "lfw_bin", "path": "b.bin"}]
    assert out["quant"]["exclude"] == ["^fc$", "layer1"]
    assert BASE_FOR_SET["finetune"] is None  # the input is not modified


def test_an_empty_key_is_named(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text('"": 1\nquant:\n  "": 2\n  " bits": 3\n')
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert sorted(err.value.problems) == sorted([
        f"{path}: '': unknown field (an empty key; see the recipe reference)",
        f"{path}: quant.'': unknown field (an empty key; see the recipe reference)",
        f"{path}: quant.' bits': unknown field (check the spelling; see the recipe reference)",
    ])


def test_a_layer_rule_needs_exactly_one_selector():
    from efquant_fx.errors import RecipeError
    from efquant_fx.recipe import load_recipe

    for rule in ({"weight_bits": 8}, {"match": "x", "role": "stem", "weight_bits": 8}):
        with pytest.raises(RecipeError, match="exactly one of match"):
            load_recipe({"quant": {"layers": [rule]}})
    with pytest.raises(RecipeError, match=r"quant.layers.0.role"):
        load_recipe({"quant": {"layers": [{"role": "stemm"}]}})


@pytest.mark.parametrize("name,model", [("mobilefacenet_w4a8", "mobilefacenet"),
                                        ("mobilefacenet_w4a4", "mobilefacenet"),
                                        ("arcface_r100_w4a8", "arcface_r18"),
                                        ("arcface_r100_w4a4", "arcface_r18")])
def test_shipped_low_bit_recipes_run_their_passes_on_their_architecture(name, model):
    """Budgets and rules select layers and every pass runs (r18 stands in for r100: the same block layout)."""
    from efquant_fx import compress
    from efquant_fx.recipe import load_recipe

    path = Path(__file__).resolve().parents[1] / "efquant_fx" / "recipes" / f"{name}.yaml"
    spec = load_recipe(path)
    overrides = ["calibration.data={kind: random}", "calibration.images=8", "calibration.batch_size=4",
                 "device=cpu", "model.random_weights=true", "finetune=null"]
    if spec.ptq.learned_rounding is not None:
        overrides.append("ptq.learned_rounding.iters=1")
    result = compress(model, path, overrides=overrides)
    kept = {r["layer"] for r in result.layers if r.get("weight_bits") == 8}
    assert kept and result.summary["quantized_layers"] == result.summary["compute_layers"]
    assert any(n.startswith("PReLU equalization:") for n in result.notes)
    if spec.quant.budget is not None:  # resolved into rules the saved recipe carries
        assert any(n.startswith("bit budget:") for n in result.notes) and result.recipe.quant.budget is None
    if spec.ptq.learned_rounding is not None:
        assert len(result.reconstruction) == result.summary["quantized_layers"]
