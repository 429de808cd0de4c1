"""The evaluator contract shared by built-in benchmarks and third-party plugins.

:class:`Evaluator` is all a plugin has to implement. :class:`EmbeddingEvaluator` is the base of the
built-ins: it embeds the benchmark's images once per model and leaves only the scoring to each.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from efquant_fx.eval.embed import extract_embeddings

if TYPE_CHECKING:
    import numpy as np
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

    ``evaluate`` may also take ``progress: bool | None = None`` (show a progress bar; ``None``: only
    on a terminal). It is optional: callers (:func:`efquant_fx.eval.run.run_evaluator`) pass it only
    to evaluators whose ``evaluate`` accepts it.
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


class EmbeddingEvaluator(ABC):
    """An :class:`Evaluator` that embeds one image set and scores the embeddings.

    Subclasses set ``name``, ``label`` and ``flip`` (embed the horizontal flip too) and implement
    two methods: :meth:`load`, the data read once, as a tuple whose first item is the
    :class:`~efquant_fx.eval.images.ImageSet` to embed; :meth:`score`, from the features
    ``[N, V, D]`` of :func:`~efquant_fx.eval.embed.extract_embeddings` and that tuple to the result.
    :meth:`evaluate` loads, embeds (with the feature cache and progress bar) and scores.
    """

    name: str
    label: str
    flip: bool

    @abstractmethod
    def load(self) -> tuple[Any, ...]:
        """The benchmark's data, read once: ``(images, *whatever score() needs)``."""

    @abstractmethod
    def score(self, feats: np.ndarray, data: Any) -> EvalResult:
        """The result for embeddings ``feats`` of ``data[0]`` (``data`` as :meth:`load` returned it)."""

    def evaluate(
        self,
        model: nn.Module,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        cache: FeatureCache | str | Path | None = None,
        progress: bool | None = None,
    ) -> EvalResult:
        """Embed the images with ``model`` (cached per model and data, see :func:`extract_embeddings`), score."""
        data = self.load()
        feats = extract_embeddings(
            model, data[0], flip=self.flip, device=device, batch_size=batch_size, cache=cache,
            progress=progress, description=self.label,
        )
        return self.score(feats, data)
