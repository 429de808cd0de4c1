"""Reload a run directory as a :class:`~efquant_fx.CompressionResult`, without calibration data.

``efquant-fx apply`` and :meth:`CompressionResult.save` leave ``recipe.yaml`` (resolved),
``compression.json`` (per-layer report) and ``model.pt`` (the compressed state dict). A state dict
needs the graph it came from, so :func:`load_result` rebuilds the teacher from the recipe's model
spec, replays the structural passes of :func:`~efquant_fx.compress` (:func:`efquant_fx.graph.passes.replay_passes`:
pruning, BN folding, equalization, quantizer insertion) and loads ``model.pt`` strictly. Nothing
data-driven is rerun (calibration, GPTQ, bias correction, fine-tuning): their effect is in the
state dict. This is what ``efquant-fx eval`` and ``efquant-fx export`` start from.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from efquant_fx.errors import EfquantError
from efquant_fx.graph.modules import ActQuant
from efquant_fx.graph.passes import replay_passes
from efquant_fx.graph.report import compressed_size_bytes, float_size_bytes, layer_table, summarize
from efquant_fx.graph.state import fit_to_state
from efquant_fx.graph.trace import trace
from efquant_fx.models import is_pretrained, list_models
from efquant_fx.models.checkpoint import check_state_dict, read_state_dict
from efquant_fx.models.loader import load_model
from efquant_fx.recipe import load_recipe
from efquant_fx.result import CompressionResult
from efquant_fx.rundir import LAST_CHECKPOINT, RECIPE_FILE, REPORT_FILE, STATE_FILE


def _read_report(path: Path) -> dict[str, Any]:
    """``compression.json`` if present (the report of the run; optional for the model itself)."""
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EfquantError(f"not a readable report ({exc})", source=str(path)) from None
    if not isinstance(report, dict):
        raise EfquantError("expected a JSON object", source=str(path))
    return report


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():  # recipe.yaml is written first, model.pt last: the run stopped in between
        resume = (f" (with --resume to continue its fine-tune from {LAST_CHECKPOINT})"
                  if (path.parent / LAST_CHECKPOINT).is_file() else "")
        raise EfquantError(f"this run did not finish: no {STATE_FILE}; rerun efquant-fx apply{resume}",
                           source=str(path.parent))
    with path.open("rb") as fh:
        if fh.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive; anything else is not ours
            raise EfquantError("not a torch.save() state dict (no zip header): damaged or another file",
                               source=str(path))
    return read_state_dict(path)  # weights_only=True; bad files become one-line EfquantErrors


def _teacher(recipe_path: Path, recipe: Any, model: nn.Module | str | Path | None,
             weights: str | Path | None) -> nn.Module:
    if model is None and recipe.model.name is None:
        raise EfquantError("the run was compressed from a Python nn.Module, so the recipe names no model; "
                           "pass model= (CLI: --model)", source=str(recipe_path), field="model.name")
    ref = model if model is not None else recipe.model.name
    if weights is None and not isinstance(model, nn.Module):
        weights = recipe.model.weights  # as compress() does
    # compress() seeds before building the teacher: a zoo model without weights gets the same init
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return load_model(ref, weights, **recipe.model.kwargs)


def load_result(
    run_dir: str | Path,
    model: nn.Module | str | Path | None = None,
    weights: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
) -> CompressionResult:
    """Rebuild the :class:`CompressionResult` saved in ``run_dir``.

    ``model`` replaces the recipe's ``model.name`` (needed when the run compressed a Python
    ``nn.Module``: pass the float model, which becomes the teacher as in ``compress()``);
    ``weights`` replaces ``model.weights``. The teacher only gives the architecture to the
    compressed model, whose every tensor comes from ``model.pt`` (read with ``weights_only=True``,
    loaded with ``strict=True``). A missing or unreadable file, or a state dict that does not fit
    the rebuilt graph, is an :class:`EfquantError` naming the file.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise EfquantError("run directory not found", source=str(run))
    recipe_path = run / RECIPE_FILE
    if not recipe_path.is_file():
        raise EfquantError(f"no {RECIPE_FILE}: not a run directory (written by efquant-fx apply or "
                           "CompressionResult.save())", source=str(run))
    recipe = load_recipe(recipe_path)
    state_path = run / STATE_FILE
    state = _read_state(state_path)
    report = _read_report(run / REPORT_FILE)

    device = torch.device(device)
    teacher = _teacher(recipe_path, recipe, model, weights).eval().to(device)
    gm = trace(copy.deepcopy(teacher), recipe.model.leaf_modules)
    gm, plans = replay_passes(gm, recipe, device=device)
    fit_to_state(gm, state)
    problems = check_state_dict(gm, state)
    if problems:
        raise EfquantError(f"does not fit the graph rebuilt from {RECIPE_FILE} ({'; '.join(problems)}); "
                           "was the run made with another model or weights?", source=str(state_path))
    try:
        gm.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # dtype or other problems check_state_dict does not see
        first = str(exc).strip().splitlines()[0]
        raise EfquantError(f"cannot be loaded into the rebuilt graph ({first})", source=str(state_path)) from None
    gm.to(device)  # tensors created for the state (biases) start on the CPU
    _restore_ranges(gm, report.get("calibration") or [])
    gm.eval()

    result = CompressionResult(model=gm, teacher=teacher, recipe=recipe,
                               size_bytes_before=float_size_bytes(teacher))
    result.layers = layer_table(gm, plans)
    result.summary = summarize(result.layers)
    result.size_bytes_after = compressed_size_bytes(gm)
    for key, attr in (("fidelity", "fidelity"), ("ptq_fidelity", "ptq_fidelity"), ("history", "history"),
                      ("timings_s", "timings"), ("calibration", "calibration"), ("reconstruction", "reconstruction"),
                      ("notes", "notes")):
        if report.get(key):
            setattr(result, attr, report[key])
    saved_hash = report.get("recipe_hash")
    if saved_hash and saved_hash != recipe.hash:
        result.notes.append(f"reload: {REPORT_FILE} was written for recipe hash {saved_hash}, {RECIPE_FILE} "
                            f"has {recipe.hash}: the recipe was edited after the run")
    if (model is None and weights is None and recipe.model.weights is None and recipe.model.name in list_models()
            and not is_pretrained(recipe.model.name)):  # SFace loads its own weights: nothing random about it
        result.notes.append(f"reload: teacher {recipe.model.name!r} rebuilt without weights (seeded random init, "
                            "as compress() made it); pass weights= (--weights) if the run's teacher was pretrained")
    return result


def _restore_ranges(gm: nn.Module, calibration: list[dict[str, Any]]) -> None:
    """Activation ranges are display metadata (the quantizer scales are in the state dict)."""
    for row in calibration:
        try:
            point = gm.get_submodule(str(row["point"]))
            lo, hi = float(row["range_min"]), float(row["range_max"])
        except (AttributeError, KeyError, TypeError, ValueError):
            continue
        if isinstance(point, ActQuant):
            point.range = (lo, hi)
