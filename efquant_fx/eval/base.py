"""The evaluator contract shared by built-in benchmarks and third-party plugins."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from efquant_fx.eval.cache import FeatureCache
    from efquant_fx.eval.result import EvalResult


@runtime_checkable
class Evaluator(Protocol):
    """A benchmark: built from options (the recipe entry), then run on any number of models.

    ``name`` is the registry name of the protocol (``lfw_bin``); ``label`` names this particular
    benchmark in reports (``cfp_fp``), so one protocol can appear several times in a recipe.
    Implementations should decode their data once and reuse it for every model they evaluate.
    Models take RGB 112x112 NCHW floats ``(x - 127.5) / 127.5`` and return raw embeddings ``[N, D]``.
    """

    name: str
    label: str

    def evaluate(
        self,
        model: nn.Module,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        cache: FeatureCache | str | Path | None = None,
    ) -> EvalResult: ...
