"""Model zoo: face backbones created by name, plus importers for ONNX and MXNet models."""

from efquant_fx.models import iresnet as _iresnet  # noqa: F401  (registers arcface_r*)
from efquant_fx.models import mobilefacenet as _mobilefacenet  # noqa: F401  (registers mobilefacenet)
from efquant_fx.models import sface as _sface  # noqa: F401  (registers sface, the embedded default teacher)
from efquant_fx.models.checkpoint import load_weights, read_state_dict
from efquant_fx.models.registry import create_model, describe_models, is_pretrained, list_models, register_model

__all__ = ["create_model", "describe_models", "is_pretrained", "list_models", "load_weights", "read_state_dict",
           "register_model"]
from efquant_fx.models.loader import load_model  # noqa: E402

__all__ += ["load_model"]
