"""Whole jobs over run directories, as the CLI runs them: ``apply`` (compress + fine-tune, evaluate
teacher and student side by side, export), ``eval`` of a run or a plain model, ``export`` of a run.

Run directory (names in :mod:`efquant_fx.rundir`): ``recipe.yaml`` (resolved), ``compression.json``
(per-layer report), ``model.pt`` (compressed state dict), fine-tune checkpoints, ``metrics.json``,
``roc.png``, ``export/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from efquant_fx.api import compress
from efquant_fx.device import resolve_device
from efquant_fx.errors import EfquantError
from efquant_fx.files import check_writable, output_dir, undo_new_folders
from efquant_fx.recipe import ExportConfig, Recipe, load_recipe
from efquant_fx.result import CompressionResult
from efquant_fx.rundir import EVAL_DIR, EXPORT_DIR, LAST_CHECKPOINT, RECIPE_FILE, RUN_FILES, RUN_FOLDERS


@dataclass
class RunReport:
    out_dir: Path
    result: CompressionResult
    metrics: dict[str, Any] = field(default_factory=dict)
    exports: dict[str, Any] = field(default_factory=dict)


def evaluate_models(recipe: Recipe, models: dict[str, nn.Module], out: Path, *,
                    evals: list[dict[str, Any]] | None = None, progress: bool = True,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every evaluator on each of ``models`` (``{role: model}``); write metrics.json and roc.png.

    ``evals`` replaces the recipe's ``eval:`` entries (``efquant-fx eval --eval``); the metrics file
    keeps the recipe's hash either way, so it still points at the run that made the model.
    """
    from efquant_fx.eval.run import evaluate_and_report

    specs = recipe.eval if evals is None else evals
    source = "--eval" if evals is not None else "recipe eval"
    if not specs:
        raise EfquantError("no evaluators: add an eval: section to the recipe or pass --eval", field="eval")
    return evaluate_and_report(specs, models, out, device=str(resolve_device(recipe.device)), source=source,
                               progress=progress, recipe_hash=recipe.hash, title=recipe.name,
                               extra={"recipe": recipe.name, **(extra or {})})


def evaluate_pair(recipe: Recipe, teacher: nn.Module, student: nn.Module, out: Path,
                  progress: bool = True, evals: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run every evaluator of the recipe on teacher and student; write metrics.json and roc.png."""
    return evaluate_models(recipe, {"teacher": teacher, "student": student}, out, evals=evals, progress=progress)


def claim_run_dir(out: Path, recipe: Recipe, *, resume: bool = False, overwrite: bool = False) -> None:
    """Make ``out`` hold this run only: a run directory with two runs' files in it (a W4A4 model.pt
    beside a W8A8 best.pt and metrics.json) reloads and reports nonsense.

    An empty or missing folder is taken. A non-empty one is refused, unless ``resume`` (the same
    recipe's run continues there: a killed fine-tune) or ``overwrite`` (the run files listed in
    :mod:`efquant_fx.rundir` are deleted first; other files are left alone).
    """
    if resume and overwrite:
        raise EfquantError("--resume continues the run in --out and --overwrite replaces it: pass one of them",
                           field="--overwrite")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if resume:
        _check_same_run(out, recipe)
    elif overwrite:
        clear_run(out)
    else:
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise EfquantError(f"not empty (holds {shown}): pass --overwrite to replace that run, --resume to continue "
                           "it, or choose another --out", source=str(out), field="--out")


def _check_same_run(out: Path, recipe: Recipe) -> None:
    """``--resume`` into ``out``: the run there must have been started by the same recipe."""
    from efquant_fx.finetune.checkpoint import resume_hash

    if not (out / RECIPE_FILE).is_file():
        raise EfquantError(f"no {RECIPE_FILE} here, so no run to continue; choose another --out",
                           source=str(out), field="--resume")
    before = load_recipe(out / RECIPE_FILE)
    if resume_hash(before) != resume_hash(recipe):
        raise EfquantError(f"the run here was started by another recipe ({before.name}: model, quantization, "
                           "data or fine-tune settings differ); resume with the same recipe, or pass --overwrite or "
                           "another --out", source=str(out), field="--resume")


def clear_run(out: Path) -> None:
    """Delete a run's files and folders from ``out`` (the names in :mod:`efquant_fx.rundir`, nothing else)."""
    import shutil

    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        if (out / name).is_dir() and not (out / name).is_symlink():
            shutil.rmtree(out / name)
        elif (out / name).is_symlink():
            (out / name).unlink()


def run_recipe(recipe: Recipe | str | Path | dict[str, Any], *, model: nn.Module | str | None = None,
               out_dir: str | Path = "runs/latest", overrides: list[str] | None = None, resume: bool = False,
               overwrite: bool = False, progress: bool = True) -> RunReport:
    """The whole job, as :command:`efquant-fx apply` runs it.

    ``out_dir`` must be empty, or hold this recipe's run with ``resume``, or be replaced with
    ``overwrite`` (:func:`claim_run_dir`).
    """
    spec = load_recipe(recipe, overrides or [])
    out = Path(out_dir)
    claim_run_dir(out, spec, resume=resume, overwrite=overwrite)
    with undo_new_folders(out):
        check_writable(out)
        fresh = not (out / RECIPE_FILE).exists()
        spec.save(out / RECIPE_FILE)  # written first: a killed fine-tune resumes from what was asked
        try:
            result = compress(model if model is not None else spec.model.name, spec, finetune_dir=out,
                              resume=resume)
        except BaseException:
            if fresh and not (out / LAST_CHECKPOINT).exists():  # nothing to resume: the same command may rerun
                (out / RECIPE_FILE).unlink(missing_ok=True)
            raise
    result.save(out)
    report = RunReport(out_dir=out, result=result)
    if spec.eval:
        report.metrics = evaluate_pair(spec, result.teacher, result.model, out, progress=progress)
    if spec.export is not None:
        from efquant_fx.export import export_model

        report.exports = export_model(result, out / EXPORT_DIR, **spec.export.model_dump())
    return report


@dataclass
class EvalJob:
    """What ``efquant-fx eval`` evaluates: the models by role, where metrics go, and reload notes."""

    target: str
    recipe: Recipe
    models: dict[str, nn.Module]
    names: list[str]
    out: Path
    evals: list[dict[str, Any]] | None
    notes: list[str] = field(default_factory=list)


def _looks_like_path(target: str) -> bool:
    return "/" in target or os.sep in target or target.startswith(".")


def _eval_specs(target: str, path: Path, given: Recipe | None, evals: list[dict[str, Any]] | None,
                model: str | None) -> tuple[Recipe, list[dict[str, Any]] | None]:
    """The recipe and evaluator entries of an eval target, checked before any model is built."""
    if evals is None and given is not None and given.eval:
        evals = given.eval
    if path.is_dir():
        if not (path / RECIPE_FILE).is_file():
            raise EfquantError(f"not a run directory (no {RECIPE_FILE}); evaluate a model by zoo name or file",
                               source=target)
        spec = load_recipe(path / RECIPE_FILE)
        if evals is None and not spec.eval:
            raise EfquantError("the run's recipe has no eval: section; pass --eval or --recipe", source=target)
        return spec, evals
    if model is not None:
        raise EfquantError("only for a run directory; name the model as the argument", field="--model")
    if _looks_like_path(target) and path.suffix.lower() not in (".onnx", ".json"):
        raise EfquantError("no such run directory (nor an .onnx / -symbol.json model)", source=target)
    if evals is None:
        raise EfquantError("no evaluators: pass --eval or a --recipe with an eval: section", field="--eval")
    return (given if given is not None else load_recipe({})), evals


def prepare_eval(target: str, *, recipe: str | Path | None = None, evals: list[dict[str, Any]] | None = None,
                 weights: str | Path | None = None, model: str | None = None,
                 out: str | Path | None = None) -> EvalJob:
    """Resolve ``target`` (a run directory, or a zoo name / model file to evaluate alone) into an
    :class:`EvalJob`. Bad evaluator specs fail before any model is loaded or folder made."""
    from efquant_fx.eval import build_evaluators
    from efquant_fx.models import load_model
    from efquant_fx.reload import load_result

    path = Path(target)
    spec, evals = _eval_specs(target, path, load_recipe(recipe) if recipe else None, evals, model)
    build_evaluators(evals if evals is not None else spec.eval, source="--eval")
    if path.is_dir():
        out_path = Path(out) if out is not None else path / EVAL_DIR
        check_writable(out_path, keep=False)  # made when metrics are written: a failed reload leaves no eval/
        result = load_result(path, model=model, weights=weights)
        notes = [n.removeprefix("reload: ") for n in result.notes if n.startswith("reload: ")]
        return EvalJob(target, result.recipe, {"teacher": result.teacher, "student": result.model},
                       ["teacher", "compressed"], out_path, evals, notes)
    out_path = Path(out) if out is not None else Path("runs/eval") / path.name.removesuffix("-symbol.json")
    models = {"model": load_model(target, weights, **spec.model.kwargs)}
    check_writable(out_path, keep=False)  # after the model resolved: a mistyped name leaves no folder behind
    return EvalJob(target, spec, models, [target], out_path, evals)


def run_eval(job: EvalJob, *, progress: bool = True) -> dict[str, Any]:
    """Evaluate every model of ``job``; writes metrics.json (and roc.png) into ``job.out``."""
    with undo_new_folders(job.out):
        return evaluate_models(job.recipe, job.models, job.out, evals=job.evals, progress=progress,
                               extra={"target": job.target})


def export_settings(base: ExportConfig | None, formats: list[str] | None = None,
                    opset: int | None = None) -> ExportConfig:
    """The recipe's ``export:`` section with the command line's formats/opset, validated by the schema."""
    from pydantic import ValidationError

    from efquant_fx.export import FORMATS

    flags = {"formats": "--format", "opset": "--opset"}
    given = {k: v for k, v in (("formats", list(dict.fromkeys(formats or []))), ("opset", opset)) if v}
    try:
        ExportConfig.model_validate(given)  # the overrides alone first: their errors name the flag
    except ValidationError as exc:
        err = exc.errors()[0]
        key, got = str(err["loc"][0]), err.get("input")
        detail = (f"unknown format {got!r}; known: {', '.join(FORMATS)}" if key == "formats"
                  else f"must be >= 13 (per-channel DequantizeLinear), got {got}")
        raise EfquantError(detail, field=flags.get(key, key)) from None
    return (base or ExportConfig()).model_copy(update=given)


def export_run(run_dir: str | Path, out: str | Path | None = None, *, formats: list[str] | None = None,
               opset: int | None = None, model: str | None = None,
               weights: str | Path | None = None) -> tuple[CompressionResult, Path, dict[str, Any]]:
    """Reload a run directory and write its deployable files (``efquant-fx export``)."""
    from efquant_fx.export import export_model
    from efquant_fx.reload import load_result

    export_settings(None, formats, opset)  # bad flags fail before the reload
    run = Path(run_dir)
    out_path = Path(out) if out is not None else run / EXPORT_DIR
    with undo_new_folders(out_path):  # nothing half-written: a run that does not reload leaves no export/
        if run.is_dir():
            output_dir(out_path, field="--out")
        result = load_result(run, model=model, weights=weights)
        config = export_settings(result.recipe.export, formats, opset)
        return result, out_path, export_model(result, out_path, **config.model_dump())
