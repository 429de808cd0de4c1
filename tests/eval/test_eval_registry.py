"""Evaluators by name, option checking, and third-party plugins found through entry points."""

from __future__ import annotations

import pickle
import textwrap
import uuid

import pytest

from efquant_fx.errors import EfquantError
from efquant_fx.eval import (
    ENTRY_POINT_GROUP,
    EvalResult,
    Evaluator,
    build_evaluators,
    get_evaluator,
    list_evaluators,
)
from tests.eval.eval_helpers import MeanColor


def test_builtins_are_listed():
    assert {"lfw_bin", "pairs", "dense", "ijb", "identification"} <= set(list_evaluators())


def test_unknown_name_and_option_are_user_errors(tmp_path):
    with pytest.raises(EfquantError, match="unknown evaluator 'nope'.*lfw_bin"):
        get_evaluator("nope")
    pack = tmp_path / "lfw.bin"
    pack.write_bytes(pickle.dumps(([b"a", b"b"], [True])))
    with pytest.raises(EfquantError, match="unexpected keyword argument 'foldz'"):
        get_evaluator("lfw_bin", path=pack, foldz=3)
    with pytest.raises(EfquantError, match="not found"):
        get_evaluator("lfw_bin", path=tmp_path / "absent.bin")
    with pytest.raises(EfquantError, match="evaluator 'dense': bad option value"):
        get_evaluator("dense", root=tmp_path, fars="abc")


def test_build_evaluators_from_recipe_entries(tmp_path):
    pack = tmp_path / "cfp_fp.bin"
    pack.write_bytes(pickle.dumps(([b"a", b"b"], [True])))
    evs = build_evaluators([{"name": "lfw_bin", "path": str(pack), "n_folds": 3}], source="recipe.yaml")
    assert evs[0].label == "cfp_fp" and evs[0].n_folds == 3 and isinstance(evs[0], Evaluator)
    with pytest.raises(EfquantError, match=r"recipe.yaml: evaluators\[1\]"):
        build_evaluators([{"name": "lfw_bin", "path": str(pack)}, {"path": "x"}], source="recipe.yaml")
    with pytest.raises(EfquantError, match="distinct 'label'"):
        build_evaluators([{"name": "lfw_bin", "path": str(pack)}] * 2)


def _install_fake_distribution(root, module: str, entry_lines: str) -> None:
    (root / f"{module}.py").write_text(
        textwrap.dedent(
            """
            from efquant_fx.eval import EvalResult

            class EchoEvaluator:
                name = "echo"

                def __init__(self, value: float = 1.0, label: str = "echo"):
                    self.value = value
                    self.label = label

                def evaluate(self, model, *, device="cpu", batch_size=64, cache=None):
                    return EvalResult(self.label, self.name, {"value": self.value})
            """
        )
    )
    dist = root / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry_lines}\n")


def test_plugin_from_entry_point_is_discovered(tmp_path, monkeypatch):
    module = f"efq_test_plugin_{uuid.uuid4().hex[:8]}"
    name = f"echo_{uuid.uuid4().hex[:6]}"
    _install_fake_distribution(
        tmp_path,
        module,
        f"{name} = {module}:EchoEvaluator\n"
        f"{name}_broken = {module}:DoesNotExist\n"
        f"lfw_bin = {module}:EchoEvaluator",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match="shadowed by a built-in"):
        names = list_evaluators()
    assert name in names and f"{name}_broken" in names
    ev = get_evaluator(name, value=0.25)
    result = ev.evaluate(MeanColor())
    assert isinstance(result, EvalResult) and result.metrics == {"value": 0.25}
    with pytest.raises(EfquantError, match="unexpected keyword"):
        get_evaluator(name, bogus=1)
    with pytest.raises(EfquantError, match=f"cannot load plugin evaluator '{name}_broken'.*{module}"):
        get_evaluator(f"{name}_broken")
    monkeypatch.delitem(__import__("sys").modules, module, raising=False)
