"""Third-party evaluators written to the documented contract run through ``efquant-fx eval``.

``progress`` is optional in the contract: an evaluator whose ``evaluate`` has no such argument must
work, and one that has it must receive it.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from efquant_fx.cli import app
from efquant_fx.eval import EmbeddingEvaluator, EvalResult, Evaluator, register_evaluator, registry, run_evaluator
from efquant_fx.eval.embed import xnorm
from efquant_fx.eval.images import ImageSet
from tests.eval.eval_helpers import CUBE_COLORS, MeanColor, solid_png

runner = CliRunner()


class ContractOnly:
    """Exactly the documented contract: ``name``, ``label``, ``evaluate(model, *, device, batch_size, cache)``."""

    name = "contract_only"

    def __init__(self, scale: float = 1.0, label: str | None = None):
        self.scale = scale
        self.label = label or self.name
        self.calls: list[dict] = []

    def evaluate(self, model, *, device="cpu", batch_size=64, cache=None):
        self.calls.append({"device": device, "batch_size": batch_size, "cache": cache})
        with torch.no_grad():
            emb = model.to(device)(torch.zeros(2, 3, 112, 112, device=device))
        metrics = {"dim": float(emb.shape[1]) * self.scale, "batch_size": batch_size}
        return EvalResult(self.label, self.name, metrics)


class WithProgress(ContractOnly):
    """The contract plus the optional ``progress`` keyword."""

    name = "with_progress"

    def evaluate(self, model, *, device="cpu", batch_size=64, cache=None, progress=None):
        result = super().evaluate(model, device=device, batch_size=batch_size, cache=cache)
        self.calls[-1]["progress"] = progress
        return result


class WithKwargs(ContractOnly):
    """``**kwargs`` accepts ``progress`` too."""

    name = "with_kwargs"

    def evaluate(self, model, **kwargs):
        result = super().evaluate(model, **{k: v for k, v in kwargs.items() if k != "progress"})
        self.calls[-1]["kwargs"] = sorted(kwargs)
        return result


@pytest.fixture
def plugin():
    """Register a class under a fresh name; return ``(name, instances built)``; unregister afterwards."""
    names: list[str] = []
    built: list[ContractOnly] = []

    def register(cls: type[ContractOnly]) -> str:
        name = f"{cls.name}_{uuid.uuid4().hex[:6]}"

        @register_evaluator(name)
        def factory(**options):
            built.append(cls(**options))
            return built[-1]

        names.append(name)
        return name

    yield register, built
    for name in names:
        registry._REGISTERED.pop(name, None)


def _eval_cli(tmp_path, spec: str) -> dict:
    out = tmp_path / "ev"
    res = runner.invoke(app, ["eval", "mobilefacenet", "--eval", spec, "--out", str(out)])
    assert res.exit_code == 0, res.output
    return json.loads((out / "metrics.json").read_text())["results"]["model"]


def test_contract_only_plugin_runs_through_the_cli(plugin, tmp_path):
    register, built = plugin
    name = register(ContractOnly)
    assert isinstance(ContractOnly(), Evaluator)
    results = _eval_cli(tmp_path, f"{{name: {name}, scale: 2, label: mine}}")
    assert results["mine"]["protocol"] == "contract_only"
    metrics = results["mine"]["metrics"]
    assert metrics["dim"] > 0 and metrics["dim"] % 2 == 0 and metrics["batch_size"] == 64
    (ev,) = [e for e in built if e.calls]  # the CLI also builds one to check the spec before any work
    assert len(ev.calls) == 1 and "progress" not in ev.calls[0]
    assert ev.calls[0]["cache"] == tmp_path / "ev" / "feature_cache"


def test_plugin_accepting_progress_gets_it(plugin, tmp_path):
    register, built = plugin
    name = register(WithProgress)
    results = _eval_cli(tmp_path, f"{{name: {name}}}")
    assert "dim" in results["with_progress"]["metrics"]
    (ev,) = [e for e in built if e.calls]
    assert ev.calls[0]["progress"] is False  # the CLI's choice: no bar when stderr is not a terminal


@pytest.mark.parametrize("progress", [True, False, None])
def test_run_evaluator_passes_progress_only_where_accepted(progress):
    model = MeanColor()
    plain, with_progress, with_kwargs = ContractOnly(), WithProgress(), WithKwargs()
    for ev in (plain, with_progress, with_kwargs):
        result = run_evaluator(ev, model, device="cpu", cache=None, progress=progress)
        assert result.metrics["dim"] == 3.0
    assert plain.calls == [{"device": "cpu", "batch_size": 64, "cache": None}]
    assert with_progress.calls[0]["progress"] is progress
    assert with_kwargs.calls[0]["kwargs"] == ["cache", "device", "progress"]
    run_evaluator(plain, model, batch_size=7)
    assert plain.calls[-1]["batch_size"] == 7


class MeanNorm(EmbeddingEvaluator):
    """A plugin on the built-ins' base: only ``load`` and ``score``."""

    name = "mean_norm"

    def __init__(self, flip: bool = True):
        self.flip = flip
        self.label = "mean_norm"

    def load(self):
        images = ImageSet([solid_png(c) for c in CUBE_COLORS], [str(c) for c in CUBE_COLORS])
        return (images, len(CUBE_COLORS))

    def score(self, feats, data):
        assert feats.shape == (data[1], 2 if self.flip else 1, 3)
        return EvalResult(self.label, self.name, {"xnorm": xnorm(feats)})


@pytest.mark.parametrize("flip", [True, False])
def test_embedding_evaluator_base_loads_embeds_and_scores(flip, tmp_path):
    ev = MeanNorm(flip=flip)
    first = run_evaluator(ev, MeanColor(), cache=tmp_path, progress=False)
    again = ev.evaluate(MeanColor(), cache=tmp_path)
    assert first.metrics == again.metrics
    np.testing.assert_allclose(first.metrics["xnorm"], np.sqrt(3), rtol=1e-6)  # cube corners: (+-1, +-1, +-1)
    assert any(tmp_path.glob("features-*.npy"))
