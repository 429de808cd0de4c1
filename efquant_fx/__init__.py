"""efquant-fx: compress face-recognition backbones to low bit widths with small data.

The public names load on first use (PEP 562), so ``import efquant_fx`` and ``efquant-fx --help`` do
not pay for torch and Brevitas until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from efquant_fx.errors import EfquantError, RecipeError

if TYPE_CHECKING:
    from efquant_fx.api import compress
    from efquant_fx.models import create_model, list_models, load_model
    from efquant_fx.recipe import Recipe, load_recipe
    from efquant_fx.reload import load_result
    from efquant_fx.result import CompressionResult

__version__ = "0.1.0"

_LAZY = {
    "compress": "efquant_fx.api",
    "create_model": "efquant_fx.models",
    "list_models": "efquant_fx.models",
    "load_model": "efquant_fx.models",
    "Recipe": "efquant_fx.recipe",
    "load_recipe": "efquant_fx.recipe",
    "load_result": "efquant_fx.reload",
    "CompressionResult": "efquant_fx.result",
}

__all__ = [
    "CompressionResult",
    "EfquantError",
    "Recipe",
    "RecipeError",
    "__version__",
    "compress",
    "create_model",
    "list_models",
    "load_model",
    "load_recipe",
    "load_result",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'efquant_fx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
