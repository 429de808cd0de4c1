"""efquant-fx: compress face-recognition backbones to low bit widths with small data."""

from efquant_fx.api import compress
from efquant_fx.errors import EfquantError, RecipeError
from efquant_fx.models import create_model, list_models, load_model
from efquant_fx.recipe import Recipe, load_recipe
from efquant_fx.reload import load_result
from efquant_fx.result import CompressionResult

__version__ = "0.1.0"

__all__ = [
    "CompressionResult",
    "EfquantError",
    "Recipe",
    "RecipeError",
    "compress",
    "create_model",
    "list_models",
    "load_model",
    "load_recipe",
    "load_result",
    "__version__",
]
