"""Plain float ONNX export of the teacher, the baseline the int8 file is compared with."""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from efquant_fx.export.files import atomic_path
from efquant_fx.export.onnx_qcdq import DEFAULT_OPSET, INPUT_NAME, example_input, finish_onnx, onnx_export_kwargs
from efquant_fx.export.parity import op_counts, parity, runtime_op_counts
from efquant_fx.export.reports import OnnxReport


def export_float_onnx(model: nn.Module, path: str | Path, *, inputs: torch.Tensor | None = None,
                      opset: int = DEFAULT_OPSET, check: bool = True, threads: int = 0) -> OnnxReport:
    """Export a float backbone with the insightface conventions (``data``, dynamic batch, one output)."""
    path = Path(path)
    source = copy.deepcopy(model).cpu().float().eval()
    example = example_input(inputs)
    t0 = time.perf_counter()
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(source, (example,), str(tmp), dynamo=False, **onnx_export_kwargs(opset))
        onnx_model = finish_onnx(tmp, expect_quant=False)
        onnx.checker.check_model(onnx_model)
        onnx.save(onnx_model, str(tmp))
    report = OnnxReport(
        path=str(path), bytes=path.stat().st_size, kind="float", opset=opset, input_name=INPUT_NAME,
        input_shape=["N", 3, 112, 112], outputs=[o.name for o in onnx_model.graph.output],
        op_counts=op_counts(onnx_model), export_seconds=time.perf_counter() - t0,
    )
    if check:
        x = (inputs if inputs is not None else example).detach().float().cpu()
        res = parity(path, x, source, None, threads)
        report.images = int(x.shape[0])
        report.cosine, report.cosine_min = res["cosine"], res["cosine_min"]
        report.cosine_between_levels = res["between_levels"]
        report.runtime_op_counts = runtime_op_counts(path)
    return report
