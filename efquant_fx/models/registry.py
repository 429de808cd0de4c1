"""A timm-style registry: backbones are created by name, so recipes can refer to them as text."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from efquant_fx.errors import EfquantError

ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {}
_DESCRIPTIONS: dict[str, str] = {}
_PRETRAINED: set[str] = set()


def register_model(name: str, description: str = "", *, pretrained: bool = False,
                   ) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator that makes ``factory`` available as ``create_model(name)``.

    ``pretrained=True`` says the factory itself loads trained weights (SFace carries its own), so a
    run of it without ``weights`` is not a random model and nothing should say it is.
    """

    def decorate(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        _DESCRIPTIONS[name] = description or (factory.__doc__ or "").strip().splitlines()[0]
        if pretrained:
            _PRETRAINED.add(name)
        return factory

    return decorate


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def is_pretrained(name: str) -> bool:
    """Whether the zoo entry ``name`` comes with trained weights of its own (no ``weights`` needed)."""
    return name in _PRETRAINED


def describe_models() -> dict[str, str]:
    """Name -> one-line description, for ``efquant-fx models``."""
    return {name: _DESCRIPTIONS[name] for name in list_models()}


def create_model(name: str, weights: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered backbone; ``weights`` is an insightface-layout state dict file.

    The weights load with ``strict=True``: a checkpoint for another architecture is refused
    with the first missing/unexpected keys and shape mismatches, never half-loaded.
    """
    if name not in _REGISTRY:
        known = ", ".join(list_models())
        raise EfquantError(f"unknown model {name!r}; known models: {known}", field="model")
    model = _REGISTRY[name](**kwargs)
    if weights is not None:
        from efquant_fx.models.checkpoint import load_weights

        load_weights(model, weights)
    return model.eval()
