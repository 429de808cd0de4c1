"""A whole recipe run, as the CLI's ``apply`` does it: compress (+ fine-tune), evaluate teacher and
student side by side, export, and leave everything in one run directory.

Run directory: ``recipe.yaml`` (resolved), ``compression.json`` (per-layer report), ``model.pt``
(compressed state dict), fine-tune checkpoints, ``metrics.json``, ``roc.png``, ``export/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from efquant_fx.api import compress, resolve_device
from efquant_fx.errors import EfquantError
from efquant_fx.recipe import Recipe, load_recipe
from efquant_fx.result import CompressionResult


@dataclass
class RunReport:
    out_dir: Path
    result: CompressionResult
    metrics: dict[str, Any] = field(default_factory=dict)
    exports: dict[str, Any] = field(default_factory=dict)


def check_writable(out: Path) -> None:
    """Fail before any work when the run directory cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise EfquantError(f"output directory is not writable ({exc.strerror})", source=str(out),
                           field="--out") from None


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


def run_recipe(recipe: Recipe | str | Path | dict[str, Any], *, model: nn.Module | str | None = None,
               out_dir: str | Path = "runs/latest", overrides: list[str] | None = None, resume: bool = False,
               progress: bool = True) -> RunReport:
    """The whole job, as :command:`efquant-fx apply` runs it."""
    spec = load_recipe(recipe, overrides or [])
    out = Path(out_dir)
    check_writable(out)
    spec.save(out / "recipe.yaml")  # written first: a failed run still says what was asked
    result = compress(model if model is not None else spec.model.name, spec, finetune_dir=out, resume=resume)
    result.save(out)
    report = RunReport(out_dir=out, result=result)
    if spec.eval:
        report.metrics = evaluate_pair(spec, result.teacher, result.model, out, progress=progress)
    if spec.export is not None:
        from efquant_fx.export import export_model

        report.exports = export_model(result, out / "export", **spec.export.model_dump())
    return report
