"""The Python API: ``compress(model, recipe)`` runs the pipeline stages in order.

recipe -> float model -> traced graph -> (pruned) -> quantized + calibrated graph -> fine-tuned
graph -> result. Each stage is a plain function in its own package; this module only sequences
them and collects what they report.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from efquant_fx.data.calibration import as_batches, calibration_batches
from efquant_fx.errors import EfquantError
from efquant_fx.graph import calibrate as calib
from efquant_fx.graph import ptq
from efquant_fx.graph.quantize import quantize_graph
from efquant_fx.graph.report import (
    compressed_size_bytes,
    embedding_cosine,
    float_size_bytes,
    layer_table,
    summarize,
)
from efquant_fx.graph.trace import trace
from efquant_fx.models.loader import load_model
from efquant_fx.recipe import Recipe, load_recipe
from efquant_fx.result import CompressionResult


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise EfquantError("device 'cuda' asked for but CUDA is not available", field="device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def rewrite_graph(
    gm: torch.fx.GraphModule,
    recipe: Recipe,
    *,
    example: torch.Tensor | None = None,
    fit_batches: Sequence[torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    timings: dict[str, float] | None = None,
) -> tuple[torch.fx.GraphModule, dict[str, Any]]:
    """The steps of :func:`compress` that shape the graph: pruning, BN folding, equalization and
    quantizer insertion, in that order. Returns the rewritten graph and the per-layer plans.

    One function for :func:`compress` and the reloaders (:func:`efquant_fx.load_result`,
    :func:`efquant_fx.export.load_packed`), so a saved state dict always meets the graph it came
    from. ``example`` (``[2,3,112,112]`` zeros by default) only lets channel pruning trace the
    model: its kept widths follow from the architecture and ratio, not from the data. Without
    ``fit_batches`` activation equalization is skipped: it only rescales weights, which the
    reloaded state dict carries.
    """
    timings = timings if timings is not None else {}
    plans: dict[str, Any] = {}
    if recipe.prune is not None and recipe.prune.kind != "none":
        t0 = time.perf_counter()
        from efquant_fx.graph import prune

        if recipe.prune.kind == "unstructured":
            prune.prune_unstructured(gm, recipe.prune.sparsity, exclude=recipe.prune.exclude)
        else:
            if example is None:
                example = torch.zeros(2, 3, 112, 112, device=device)
            prune.prune_channels(gm, recipe.prune.sparsity, example, exclude=recipe.prune.exclude)
            gm = trace(gm) if not isinstance(gm, torch.fx.GraphModule) else gm
        timings["prune"] = time.perf_counter() - t0

    q = recipe.quant
    if q is not None and q.enabled:
        t0 = time.perf_counter()
        if q.batchnorm == "fold":
            gm = ptq.fold_batchnorm(gm)
        if recipe.ptq.cross_layer_equalization:
            gm = ptq.cross_layer_equalization(gm, recipe.ptq.cross_layer_equalization)
        if recipe.ptq.act_equalization and fit_batches is not None:
            gm = ptq.activation_equalization(gm, recipe.ptq.act_equalization, fit_batches, device)
        plans = quantize_graph(gm, q)
        gm.to(device)
        timings["rewrite"] = time.perf_counter() - t0
    return gm, plans


def _out_of_memory(exc: BaseException, stage: str, batch_size: int, device: torch.device) -> EfquantError:
    """CUDA out of memory while calibrating, as one line that says which batch size to lower."""
    detail = ". ".join((str(exc).strip().splitlines() or ["out of memory"])[0].split(". ")[:2]).rstrip(".")
    hint = " (GPTQ holds one Hessian per layer: add large layers to ptq.gptq_exclude)" if stage == "GPTQ" else ""
    return EfquantError(
        f"out of memory on {device} during {stage} with calibration batches of {batch_size} images ({detail}); "
        f"use a smaller batch: lower calibration.batch_size{hint}",
        field="calibration.batch_size",
    )


def compress(
    model: nn.Module | str | Path,
    recipe: Recipe | dict[str, Any] | str | Path,
    *,
    calibration_data: torch.Tensor | Iterable[Any] | None = None,
    overrides: Sequence[str] = (),
    weights: str | Path | None = None,
    finetune_dir: str | Path | None = None,
    resume: bool = False,
) -> CompressionResult:
    """Compress ``model`` as ``recipe`` says and return the compressed graph with its report.

    ``model`` is an ``nn.Module``, a registry name or an ONNX/MXNet file; the original is never
    modified (the compressed copy is a new GraphModule, the float original becomes the teacher).
    ``calibration_data`` (a tensor of preprocessed images or an iterable of batches) overrides the
    recipe's ``calibration.data``. ``finetune_dir`` receives fine-tune checkpoints; with
    ``resume`` a killed fine-tune continues from its last checkpoint there.
    """
    recipe = load_recipe(recipe, list(overrides))
    torch.manual_seed(recipe.seed)
    device = resolve_device(recipe.device)
    timings: dict[str, float] = {}
    notes: list[str] = []

    weights_path = weights or recipe.model.weights
    if weights_path is not None and not Path(weights_path).expanduser().is_file():  # relative: to the cwd
        raise EfquantError("weights file not found", source=str(Path(weights_path).expanduser().absolute()),
                           field="model.weights" if weights is None else "weights")
    t0 = time.perf_counter()
    float_model = load_model(model if model is not None else recipe.model.name,
                             weights or recipe.model.weights, **recipe.model.kwargs)
    teacher = float_model.eval().to(device)
    student = copy.deepcopy(teacher)
    gm = trace(student, recipe.model.leaf_modules)
    size_before = float_size_bytes(teacher)
    timings["load_and_trace"] = time.perf_counter() - t0

    cal = recipe.calibration
    stage = "loading the calibration images"  # what ran out of memory, if something does
    try:
        t0 = time.perf_counter()
        if calibration_data is not None:
            batches = as_batches(calibration_data, cal.batch_size, cal.images)
        else:
            batches = calibration_batches(cal.data, cal.images, cal.batch_size, recipe.seed, teacher)
            if cal.data.kind == "random":
                notes.append("calibrated on random inputs (calibration.data.kind=random): fine for a smoke test, "
                             "not for accuracy; use face images or kind: synthetic")
        batches = [b.to(device) for b in batches]
        if not batches:
            raise EfquantError("calibration data is empty", field="calibration.data")
        held_out = batches[-1] if len(batches) > 1 else batches[0]
        fit_batches = batches[:-1] if len(batches) > 1 else batches
        timings["calibration_data"] = time.perf_counter() - t0

        calibration_stats: list[dict[str, Any]] = []
        stage = "the graph rewrite (pruning, equalization)"
        gm, plans = rewrite_graph(gm, recipe, example=held_out[:2], fit_batches=fit_batches, device=device,
                                  timings=timings)
        q = recipe.quant
        if q is not None and q.enabled:
            if q.batchnorm == "reestimate":  # BN statistics under quantized weights, before ranges are taken
                t0 = time.perf_counter()
                stage = "BatchNorm re-estimation"
                with calib.points_disabled(gm):
                    ptq.reestimate_batchnorm(gm, fit_batches, device)
                timings["bn_reestimate"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            stage = "calibration"
            calibration_stats = calib.calibrate(gm, fit_batches, device)
            timings["calibrate"] = time.perf_counter() - t0
            if recipe.ptq.gptq:
                t0 = time.perf_counter()
                stage = "GPTQ"
                skipped = ptq.gptq(gm, fit_batches, recipe.ptq.gptq_exclude, recipe.ptq.gptq_act_order, device)
                if skipped:
                    notes.append(f"GPTQ skipped {', '.join(skipped)} (ptq.gptq_exclude)")
                timings["gptq"] = time.perf_counter() - t0
            if recipe.ptq.bias_correction:
                t0 = time.perf_counter()
                stage = "bias correction"
                ptq.bias_correction(gm, fit_batches, device)
                timings["bias_correction"] = time.perf_counter() - t0

        gm.eval()
        result = CompressionResult(
            model=gm, teacher=teacher, recipe=recipe, calibration=calibration_stats, timings=timings, notes=notes,
            size_bytes_before=size_before,
        )
        result.layers = layer_table(gm, plans)
        result.summary = summarize(result.layers)
        result.size_bytes_after = compressed_size_bytes(gm)
        stage = "the fidelity check"
        result.fidelity = embedding_cosine(teacher, gm, held_out)
    except torch.OutOfMemoryError as exc:
        raise _out_of_memory(exc, stage, cal.batch_size, device) from None

    if recipe.finetune is not None:
        from efquant_fx.finetune import finetune  # the fine-tune stage
        from efquant_fx.finetune.trainer import fidelity_evaluator

        result.ptq_fidelity = dict(result.fidelity)
        # checkpoints are chosen on the batch calibration left out: the same yardstick as result.fidelity
        result.notes.append(f"fine-tune evaluation: teacher-student cosine on the held-out calibration batch "
                            f"({held_out.shape[0]} images)")
        finetune(result, out_dir=Path(finetune_dir) if finetune_dir else None, resume=resume,
                 evaluator=fidelity_evaluator(teacher, held_out))
        result.fidelity = embedding_cosine(teacher, result.model, held_out)
    return result
