"""QCDQ ONNX export of a compressed graph, through Brevitas's TorchScript-based exporter.

Brevitas's default on torch >= 2.9 is the dynamo exporter, which refuses layers with quantized
bias ("QCDQ export with dynamo=True does not support quantized bias", toolkits.md §1.6); the
TorchScript path (``dynamo=False``, needs ``onnxoptimizer``) exports our graphs, ActQuant
wrappers included (their ``quant``-mode branch is resolved at trace time). The file follows the
insightface convention: one input ``data`` of shape ``[N, 3, 112, 112]`` with a symbolic batch,
one output (the embedding).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
import torch.fx as fx
from torch import nn

from efquant_fx.errors import EfquantError
from efquant_fx.export.bn_fold import fold_quantized_batchnorm
from efquant_fx.export.files import atomic_path
from efquant_fx.export.onnx_rewrite import (
    activations_to_uint8,
    drop_initializer_inputs,
    prelu_to_elementwise,
    set_batch_dim,
    shorten_tensor_names,
)
from efquant_fx.export.parity import float_compute, op_counts, parity, runtime_op_counts
from efquant_fx.export.reports import OnnxReport
from efquant_fx.export.requant import act_points_not_quantizing, add_output_points

INPUT_NAME = "data"
OUTPUT_NAME = "embedding"
DEFAULT_OPSET = 13  # per-channel DequantizeLinear needs 13; onnxruntime runs it everywhere


def onnx_export_kwargs(opset: int) -> dict:
    return dict(
        opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}}, do_constant_folding=True,
    )


def finish_onnx(tmp: Path, expect_quant: bool) -> onnx.ModelProto:
    """Common post-processing: initializers out of the inputs, symbolic batch, one-output check."""
    model = onnx.load(str(tmp))
    drop_initializer_inputs(model)
    set_batch_dim(model)
    if len(model.graph.output) != 1:
        raise RuntimeError(f"exported graph has {len(model.graph.output)} outputs, expected 1 (the embedding)")
    if expect_quant and not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        raise RuntimeError("exported graph has no QuantizeLinear: the quantizers were not exported")
    return model


def example_input(inputs: torch.Tensor | None) -> torch.Tensor:
    if inputs is not None:
        return inputs[:1].detach().float().cpu()
    return torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1


HADAMARD_WARNING = "fast_hadamard_transform package not found"


def _brevitas_exporter():
    """Brevitas's QCDQ exporter, imported without its ``fast_hadamard_transform`` UserWarning.

    Importing ``brevitas.export`` imports ``brevitas.graph.equalize``, which warns on every first
    import that an optional CUDA kernel package for Hadamard rotations is missing. We use no
    rotations, so the warning only alarmed users on every export; other warnings still show.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=HADAMARD_WARNING, category=UserWarning)
        from brevitas.export import export_onnx_qcdq

    return export_onnx_qcdq


def export_onnx_qcdq(
    model: nn.Module,
    path: str | Path,
    *,
    calibration: Sequence[torch.Tensor] = (),
    inputs: torch.Tensor | None = None,
    int8_kernels: bool = True,
    act_symmetric: bool = True,
    observer: str = "minmax",
    requantize_linear: bool = False,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    threads: int = 0,
) -> OnnxReport:
    """Export the compressed graph ``model`` to QCDQ ONNX at ``path`` and check it in onnxruntime.

    ``int8_kernels`` folds kept BatchNorms into their quantized convs
    (:mod:`efquant_fx.export.bn_fold`), adds calibrated 8-bit requantization points after quantized
    conv outputs that have none (:mod:`efquant_fx.export.requant`; a recipe with ``compute_output``
    in ``quant.act_points`` already has them; needs ``calibration`` batches) and stores activations as
    uint8, so onnxruntime fuses ``QLinearConv``/``QLinearAdd``; without it the file mirrors the
    compressed graph exactly but runs its convs in float. ``requantize_linear`` also quantizes the
    embedding layer's output (``QGemm``); off by default, since it rounds the embedding itself to
    8 bits for a negligible speed gain. ``inputs`` (``[N, 3, 112, 112]``) are used
    for the parity check; the model itself is never modified.
    """
    brevitas_export = _brevitas_exporter()
    path = Path(path)
    source = copy.deepcopy(model).cpu().eval()
    lazy = act_points_not_quantizing(source)
    if lazy:
        raise EfquantError(f"{len(lazy)} activation quant point(s) are not calibrated/quantizing "
                           f"(e.g. {lazy[0]}); run calibration before export", field="export")
    notes: list[str] = []
    added: list[str] = []
    if int8_kernels:
        if not calibration:
            raise EfquantError("int8_kernels needs calibration batches for the output requantization points",
                               field="export.calibration")
        if not isinstance(source, fx.GraphModule):
            raise EfquantError("int8_kernels needs the compressed torch.fx GraphModule", field="export")
        folded = fold_quantized_batchnorm(source)
        if folded.folded:
            notes.append(folded.note())
        added = add_output_points(source, [b.cpu() for b in calibration], symmetric=act_symmetric,
                                  observer=observer, include_linear=requantize_linear)
        if added:
            notes.append(f"added {len(added)} 8-bit requantization points on conv outputs for integer kernels; "
                         "the fake-quant model never saw them (put compute_output in quant.act_points "
                         "to calibrate and fine-tune with them, and match this file)")
    t0 = time.perf_counter()
    example = example_input(inputs)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            brevitas_export(source, args=example, export_path=str(tmp), dynamo=False,
                            keep_initializers_as_inputs=False, **onnx_export_kwargs(opset))
        except ModuleNotFoundError as exc:
            raise EfquantError(f"ONNX export needs onnx and onnxoptimizer installed ({exc})", field="export") from None
        onnx_model = finish_onnx(tmp, expect_quant=True)
        if int8_kernels:
            activations_to_uint8(onnx_model)
            if prelu_to_elementwise(onnx_model):
                notes.append("PRelu written as Mul/Max (bit-identical; onnxruntime's PRelu kernel is its slowest op)")
        shorten_tensor_names(onnx_model)
        onnx.checker.check_model(onnx_model)
        onnx.save(onnx_model, str(tmp))
    seconds = time.perf_counter() - t0
    report = OnnxReport(
        path=str(path), bytes=path.stat().st_size, kind="qcdq", opset=opset, input_name=INPUT_NAME,
        input_shape=["N", 3, 112, 112], outputs=[o.name for o in onnx_model.graph.output],
        op_counts=op_counts(onnx_model), added_output_points=len(added), export_seconds=seconds, notes=notes,
    )
    if check:
        check_report(report, source, model, inputs if inputs is not None else example, threads)
    return report


def check_report(report: OnnxReport, exported: nn.Module, original: nn.Module | None,
                 inputs: torch.Tensor, threads: int = 0) -> OnnxReport:
    """Fill the parity and runtime-op fields of ``report`` (onnxruntime at both levels)."""
    exported = exported.cpu().eval()
    x = inputs.detach().float().cpu()
    second = None
    if original is not None and original is not exported:
        original_cpu = copy.deepcopy(original).cpu().eval()
        second = original_cpu
    res = parity(report.path, x, exported, second, threads)
    report.images = int(x.shape[0])
    report.cosine, report.cosine_min = res["cosine"], res["cosine_min"]
    report.cosine_vs_compressed = res["cosine_vs_compressed"] or dict(res["cosine"])
    report.cosine_between_levels = res["between_levels"]
    report.runtime_op_counts = runtime_op_counts(report.path)
    report.float_compute = float_compute(report.runtime_op_counts)
    return report
