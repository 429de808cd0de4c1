"""One entry point from "what the user named" to a float nn.Module: registry name, ONNX file,
MXNet symbol, or a module the user already built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from efquant_fx.errors import EfquantError
from efquant_fx.models.registry import create_model, list_models


def load_model(name_or_module: str | Path | nn.Module | None, weights: str | Path | None = None,
               **kwargs: Any) -> nn.Module:
    """Resolve a model reference.

    - an ``nn.Module``: used as given (``weights`` loaded strictly if passed);
    - a registry name (``efquant-fx models``): built, then ``weights`` loaded strictly;
    - ``*.onnx``: converted to an FX graph (insightface packs, OpenCV SFace);
    - ``*-symbol.json``: an MXNet model, with ``weights`` (or ``*-0000.params`` beside it).
    """
    if isinstance(name_or_module, nn.Module):
        if weights is not None:
            from efquant_fx.models.checkpoint import load_weights

            load_weights(name_or_module, weights)
        return name_or_module.eval()
    if name_or_module is None:
        raise EfquantError("no model given (recipe model.name or --model)", field="model.name")
    ref = str(name_or_module)
    if ref in list_models():
        return create_model(ref, weights=weights, **kwargs)
    path = Path(ref)
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise EfquantError("ONNX file not found", source=ref, field="model.name")
        from efquant_fx.models.onnx_import import load_onnx_model

        return load_onnx_model(path).eval()
    if path.suffix.lower() == ".json":
        if not path.is_file():
            raise EfquantError("MXNet symbol file not found", source=ref, field="model.name")
        params = Path(weights) if weights else Path(str(path).replace("-symbol.json", "-0000.params"))
        from efquant_fx.models.mxnet_import import load_mxnet_model

        return load_mxnet_model(path, params).eval()
    known = ", ".join(list_models())
    raise EfquantError(
        f"unknown model {ref!r}: not a registered name ({known}) nor an .onnx / -symbol.json file",
        field="model.name",
    )
