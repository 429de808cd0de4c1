"""Deployable outputs of a compressed model: int8 ONNX, native torch int8, packed sub-8-bit weights.

``export_model(result, out_dir)`` writes every requested format into one folder together with an
``export.json`` manifest, and returns the per-format reports:

- ``onnx_qcdq`` -> ``model_int8.onnx``: QCDQ ONNX (insightface conventions: input ``data``
  ``[N,3,112,112]``, one output) that onnxruntime runs with QLinearConv/QLinearAdd kernels;
- ``onnx_float`` -> ``teacher_fp32.onnx``: the float teacher, for comparison;
- ``packed`` -> ``model_packed.npz``: weights bit-packed at their widths (W2-W8), reloadable with
  :func:`load_packed` (reloaded once here: ``max_abs_diff`` is its parity with the model);
- ``torch_int8`` -> ``model_int8.torchscript.pt``: torch.ao x86/ARM int8 kernels (8-bit models only).
"""

from __future__ import annotations

import json
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from efquant_fx.data.calibration import as_batches, calibration_batches
from efquant_fx.errors import EfquantError
from efquant_fx.export.files import atomic_write_text, output_dir, undo_new_folders
from efquant_fx.export.onnx_float import export_float_onnx
from efquant_fx.export.onnx_qcdq import export_onnx_qcdq
from efquant_fx.export.packed import load_packed, read_packed, save_packed
from efquant_fx.export.reports import OnnxReport, PackedReport, TorchInt8Report

FORMATS = ("onnx_qcdq", "onnx_float", "packed", "torch_int8")  # recipe.ExportFormat lists the same
DEFAULT_FORMATS = ("onnx_qcdq", "packed", "torch_int8")
FILE_NAMES = {
    "onnx_qcdq": "model_int8.onnx",
    "onnx_float": "teacher_fp32.onnx",
    "packed": "model_packed.npz",
    "torch_int8": "model_int8.torchscript.pt",
}

__all__ = [
    "DEFAULT_FORMATS", "FILE_NAMES", "FORMATS", "OnnxReport", "PackedReport", "TorchInt8Report",
    "export_float_onnx", "export_model", "export_onnx_qcdq", "load_packed", "read_packed", "save_packed",
]


def _calibration(result: Any, calibration: torch.Tensor | Iterable[torch.Tensor] | None) -> list[torch.Tensor]:
    """The given batches, or the recipe's calibration images rebuilt (same seed as ``compress()``).

    The teacher goes along: synthetic images (the quickstart's) are made from it, and read back from
    the recipe's ``cache`` when ``compress()`` left them there.
    """
    cal = result.recipe.calibration
    if calibration is not None:
        batches = as_batches(calibration, cal.batch_size, cal.images)
    else:
        batches = calibration_batches(cal.data, cal.images, cal.batch_size, result.recipe.seed,
                                      teacher=getattr(result, "teacher", None))
    batches = [b.detach().float().cpu() for b in batches]
    if not batches:
        raise EfquantError("calibration data is empty", field="calibration.data")
    return batches


def _check_formats(formats: Sequence[str] | str) -> list[str]:
    formats = [formats] if isinstance(formats, str) else list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise EfquantError(f"unknown export format(s) {unknown or formats!r}; known: {', '.join(FORMATS)}",
                           field="export.formats")
    return list(dict.fromkeys(formats))


def export_model(
    result: Any,
    out_dir: str | Path,
    formats: Sequence[str] | str = DEFAULT_FORMATS,
    inputs: torch.Tensor | None = None,
    *,
    calibration: torch.Tensor | Iterable[torch.Tensor] | None = None,
    int8_kernels: bool = True,
    requantize_linear: bool = False,
    check_images: int = 16,
    opset: int = 13,
) -> dict[str, Any]:
    """Write ``formats`` of a :class:`~efquant_fx.CompressionResult` into ``out_dir``.

    ``inputs`` (``[N,3,112,112]``, preprocessed) are used for the parity checks; by default the last
    calibration batch. ``calibration`` overrides the recipe's calibration images (needed when
    ``compress()`` was given ``calibration_data=``): the int8 ONNX calibrates its output
    requantization points and torch.ao its observers on them. Formats that do not apply (torch int8
    of a 4-bit model) are reported as ``{"skipped": reason}``, not raised. The keyword arguments are
    the recipe's ``export:`` section (:class:`efquant_fx.recipe.ExportConfig`).
    """
    formats = _check_formats(formats)
    needs_data = "torch_int8" in formats or ("onnx_qcdq" in formats and int8_kernels)
    batches = _calibration(result, calibration) if needs_data else []
    if inputs is None:
        inputs = batches[-1] if batches else _calibration(result, calibration)[-1]
    inputs = inputs[:check_images].detach().float().cpu()
    with undo_new_folders(out_dir):  # a format that fails before writing leaves no empty folder
        return _write_formats(result, output_dir(out_dir), formats, batches, inputs, int8_kernels=int8_kernels,
                              requantize_linear=requantize_linear, opset=opset)


def _write_formats(result: Any, out: Path, formats: list[str], batches: list[torch.Tensor], inputs: torch.Tensor,
                   *, int8_kernels: bool, requantize_linear: bool, opset: int) -> dict[str, Any]:
    """Each format's file, then ``export.json`` naming them all with their parity reports."""
    q = result.recipe.quant
    reports: dict[str, Any] = {}
    for fmt in formats:
        path = out / FILE_NAMES[fmt]
        if fmt == "onnx_qcdq":
            reports[fmt] = export_onnx_qcdq(
                result.model, path, calibration=batches, inputs=inputs, int8_kernels=int8_kernels,
                act_symmetric=q.act_symmetric if q is not None else True, opset=opset,
                requantize_linear=requantize_linear,
                observer=q.observer if q is not None else "minmax",
            )
        elif fmt == "onnx_float":
            reports[fmt] = export_float_onnx(result.teacher, path, inputs=inputs, opset=opset)
        elif fmt == "packed":
            reports[fmt] = save_packed(result, path)
            reports[fmt].max_abs_diff = _packed_parity(result, path, inputs)
        else:
            from efquant_fx.export.torch_int8 import export_torch_int8, int8_blockers

            blockers = int8_blockers(result.model)
            if blockers:
                reports[fmt] = {"skipped": f"not an 8-bit model ({blockers[0]}{' ...' if len(blockers) > 1 else ''})"}
                continue
            reports[fmt] = export_torch_int8(result.model, path, calibration=batches, inputs=inputs,
                                             teacher=result.teacher)
    manifest = {
        "recipe": result.recipe.name, "recipe_hash": result.recipe.hash,
        "files": {fmt: FILE_NAMES[fmt] for fmt, rep in reports.items() if not isinstance(rep, dict)},
        "reports": {fmt: rep if isinstance(rep, dict) else rep.to_dict() for fmt, rep in reports.items()},
        "versions": {"torch": torch.__version__, "python": platform.python_version(), **_versions()},
    }
    atomic_write_text(out / "export.json", json.dumps(manifest, indent=2, default=str))
    reports["manifest"] = str(out / "export.json")
    return reports


@torch.no_grad()
def _packed_parity(result: Any, path: Path, inputs: torch.Tensor) -> float:
    """Largest embedding difference between the packed file, reloaded, and the compressed model:
    a file that does not give the model back is not an export (0.0 on the CPU: bit-exact, so two
    images tell; the reload itself already checks every integer weight)."""
    restored = load_packed(path, result)
    x = inputs[:2]
    device = next(result.model.parameters()).device
    ref = result.model.eval()(x.to(device)).float().cpu()
    return float((restored(x).float() - ref).abs().max())


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for pkg in ("brevitas", "onnx", "onnxruntime", "onnxoptimizer"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return found
