"""The Python API: ``compress(model, recipe)`` runs the pipeline stages in order.

recipe -> float model -> traced graph -> graph passes (prune, fold BN, equalize, quantize,
calibrate, ...) -> fine-tuned graph -> result. Each stage lives in its own package; this module
only sequences them and collects what they report.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from efquant_fx.data.calibration import as_batches, calibration_batches
from efquant_fx.device import resolve_device
from efquant_fx.errors import EfquantError
from efquant_fx.graph.passes import PassContext, build_passes, run_passes
from efquant_fx.graph.report import (
    compressed_size_bytes,
    coverage_note,
    embedding_cosine,
    float_size_bytes,
    layer_table,
    summarize,
)
from efquant_fx.graph.trace import auto_leaf_notes, trace
from efquant_fx.models.check import check_finite_teacher
from efquant_fx.models.loader import load_model
from efquant_fx.models.registry import is_pretrained, list_models
from efquant_fx.recipe import Recipe, load_recipe
from efquant_fx.result import CompressionResult

__all__ = ["compress", "resolve_device"]

log = logging.getLogger(__name__)


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


def _out_of_memory(exc: BaseException, stage: str, batch_size: int, device: torch.device) -> EfquantError:
    """CUDA out of memory while calibrating, as one line that says which batch size to lower."""
    detail = ". ".join((str(exc).strip().splitlines() or ["out of memory"])[0].split(". ")[:2]).rstrip(".")
    hint = " (GPTQ holds one Hessian per layer: add large layers to ptq.gptq_exclude)" if stage == "GPTQ" else ""
    return EfquantError(
        f"out of memory on {device} during {stage} with calibration batches of {batch_size} images ({detail}); "
        f"use a smaller batch: lower calibration.batch_size{hint}",
        field="calibration.batch_size",
    )


def _require_weights(model: nn.Module | str | Path | None, recipe: Recipe, weights: str | Path | None) -> None:
    """A zoo model with random weights only when the recipe says so: silently compressing one helps nobody."""
    name = model if model is not None else recipe.model.name
    if isinstance(name, str) and name in list_models() and not is_pretrained(name) \
            and (weights or recipe.model.weights) is None and not recipe.model.random_weights:
        raise EfquantError(f"zoo model '{name}' has no trained weights of its own: pass them (--weights "
                           "backbone.pth, or model.weights), or set model.random_weights: true (CLI "
                           "--random-weights) to compress a random-weight model on purpose", field="model.weights")


def _load_teacher(model: nn.Module | str | Path | None, recipe: Recipe, weights: str | Path | None,
                  device: torch.device) -> nn.Module:
    weights_path = weights or recipe.model.weights
    if weights_path is not None and not Path(weights_path).expanduser().is_file():  # relative: to the cwd
        raise EfquantError("weights file not found", source=str(Path(weights_path).expanduser().absolute()),
                           field="model.weights" if weights is None else "weights")
    float_model = load_model(model if model is not None else recipe.model.name, weights_path, **recipe.model.kwargs)
    return float_model.eval().to(device)


def _calibration_images(recipe: Recipe, data: torch.Tensor | Iterable[Any] | None, teacher: nn.Module,
                        device: torch.device, notes: list[str]) -> list[torch.Tensor]:
    cal = recipe.calibration
    if data is not None:
        batches = as_batches(data, cal.batch_size, cal.images)
    else:
        batches = calibration_batches(cal.data, cal.images, cal.batch_size, recipe.seed, teacher, notes)
        if cal.data.kind == "random":
            notes.append("calibrated on random inputs (calibration.data.kind=random): fine for a smoke test, "
                         "not for accuracy; use face images or kind: synthetic")
    if not batches:
        raise EfquantError("calibration data is empty", field="calibration.data")
    return [b.to(device) for b in batches]


MIN_HELD_OUT = 4  # images kept from a single calibration batch to score the result on


def split_held_out(batches: list[torch.Tensor], notes: list[str]) -> tuple[list[torch.Tensor], torch.Tensor, bool]:
    """``(calibration batches, held-out images, whether they are really held out)``.

    The fidelity (and the fine-tune's choice of checkpoint) is measured on images calibration did
    not see: the last batch when there are several; with a single batch, its last quarter (at least
    ``MIN_HELD_OUT`` images). With fewer than ``2 * MIN_HELD_OUT`` images nothing can be spared: the
    score is taken on the calibration images themselves, and a note says so.
    """
    if len(batches) > 1:
        return batches[:-1], batches[-1], True
    only = batches[0]
    n = int(only.shape[0])
    if n < 2 * MIN_HELD_OUT:
        notes.append(f"no images were held out: calibration has only {n} image(s), so the teacher-student cosine is "
                     f"measured on the calibration images themselves; use calibration.images >= {2 * MIN_HELD_OUT}")
        return batches, only, False
    k = max(MIN_HELD_OUT, n // 4)
    notes.append(f"calibration has a single batch: {n - k} images calibrate, {k} are held out to score the result")
    return [only[: n - k]], only[n - k:], True


def _score(teacher: nn.Module, model: nn.Module, images: torch.Tensor, held_out: bool) -> dict[str, Any]:
    """Teacher-student cosine, with ``held_out`` saying whether calibration saw these images."""
    return {**embedding_cosine(teacher, model, images), "held_out": held_out}


def _finetune(result: CompressionResult, held_out: torch.Tensor, separate: bool, finetune_dir: str | Path | None,
              resume: bool) -> None:
    from efquant_fx.finetune import fidelity_evaluator, finetune  # the fine-tune stage

    result.ptq_fidelity = dict(result.fidelity)
    # checkpoints are chosen on the images calibration left out: the same yardstick as result.fidelity
    where = "the held-out calibration batch" if separate else "the calibration images (none held out)"
    result.notes.append(f"fine-tune evaluation: teacher-student cosine on {where} ({held_out.shape[0]} images)")
    finetune(result, out_dir=Path(finetune_dir) if finetune_dir else None, resume=resume,
             evaluator=fidelity_evaluator(result.teacher, held_out))
    result.fidelity = _score(result.teacher, result.model, held_out, separate)


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
    ctx = PassContext(device=device)
    _require_weights(model, recipe, weights)
    with _timed(ctx.timings, "load_and_trace"):
        log.info("compress: loading and tracing %s", model if isinstance(model, str | Path) else type(model).__name__)
        teacher = _load_teacher(model, recipe, weights, device)
        gm = trace(copy.deepcopy(teacher), recipe.model.leaf_modules)
        ctx.notes.extend(auto_leaf_notes(gm))

    ctx.stage = "loading the calibration images"  # what ran out of memory, if something does
    try:
        with _timed(ctx.timings, "calibration_data"):
            batches = _calibration_images(recipe, calibration_data, teacher, device, ctx.notes)
        # images held out to score the result (and fine-tune checkpoints)
        check_finite_teacher(teacher, batches[0][:2], source=str(model) if isinstance(model, str | Path) else None)
        ctx.batches, held_out, separate = split_held_out(batches, ctx.notes)
        ctx.example = held_out[:2]
        log.info("compress: %d calibration images, %d %s", sum(b.shape[0] for b in ctx.batches), held_out.shape[0],
                 "held out" if separate else "to score on (none held out)")
        gm = run_passes(gm, build_passes(recipe), ctx).eval()
        ctx.stage = "the fidelity check"
        fidelity = _score(teacher, gm, held_out, separate)
        log.info("compress: teacher-student cosine %.4f (worst %.4f)", fidelity["cosine_mean"], fidelity["cosine_min"])
    except torch.OutOfMemoryError as exc:
        raise _out_of_memory(exc, ctx.stage, recipe.calibration.batch_size, device) from None

    if ctx.quant is not None:  # the budget's choice, as rules: the saved recipe rebuilds this graph
        recipe = recipe.model_copy(update={"quant": ctx.quant})
    if (note := coverage_note(gm)) is not None:
        ctx.notes.append(note)
    layers = layer_table(gm, ctx.plans)
    result = CompressionResult(
        model=gm, teacher=teacher, recipe=recipe, layers=layers, summary=summarize(layers),
        size_bytes_before=float_size_bytes(teacher), size_bytes_after=compressed_size_bytes(gm),
        calibration=ctx.calibration, reconstruction=ctx.reconstruction, fidelity=fidelity, timings=ctx.timings,
        notes=ctx.notes,
    )
    if recipe.finetune is not None:
        _finetune(result, held_out, separate, finetune_dir, resume)
    return result
