"""``efquant-fx``: a thin command line over the Python API.

Exit codes: 0 ok, 2 bad input (one line per problem, no traceback), 1 failure during the run
(``--verbose`` shows the traceback). ``NO_COLOR`` and non-TTY output are respected by rich.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from efquant_fx.errors import EfquantError

app = typer.Typer(help="Compress face-recognition backbones to low bit widths with small data.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
recipes_app = typer.Typer(help="Work with recipe files.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")

console = Console(stderr=False, no_color=bool(os.environ.get("NO_COLOR")) or None)
err_console = Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")) or None)
_state = {"verbose": False}


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map user errors to exit code 2 with one line each, and crashes to exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EfquantError as exc:
            for line in str(exc).splitlines() or [type(exc).__name__]:
                err_console.print(f"error: {line}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted", markup=False)
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except Exception as exc:  # a bug or an environment failure, not bad input
            if _state["verbose"]:
                traceback.print_exc()
            err_console.print(f"failed: {type(exc).__name__}: {exc} (run with --verbose for the traceback)",
                              markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show tracebacks on failure")] = False):
    _state["verbose"] = verbose


@app.command("models")
@guarded
def models_cmd() -> None:
    """List the model zoo (names accepted by --model and recipe model.name)."""
    from efquant_fx.models import create_model, describe_models

    table = Table(title="efquant-fx model zoo")
    table.add_column("name")
    table.add_column("params (M)", justify="right")
    table.add_column("description")
    for name, desc in describe_models().items():
        params = sum(p.numel() for p in create_model(name).parameters()) / 1e6
        table.add_row(name, f"{params:.3f}", desc)
    console.print(table)
    console.print("Also accepted: an .onnx face model, an MXNet '-symbol.json', or any nn.Module from Python.")


@recipes_app.command("validate")
@guarded
def recipes_validate(
    files: Annotated[list[Path], typer.Argument(help="recipe YAML files")],
    set_: Annotated[list[str], typer.Option("--set", help="override key.path=value")] = [],  # noqa: B006
) -> None:
    """Validate recipes; print each problem as 'file: field: expected ...'."""
    from efquant_fx.errors import RecipeError
    from efquant_fx.recipe import load_recipe

    problems: list[str] = []
    for f in files:
        try:
            r = load_recipe(f, set_)
            console.print(f"{f}: ok ({r.name}, hash {r.hash})", markup=False)
        except RecipeError as exc:
            problems += exc.problems
    if problems:
        raise RecipeError(problems)


@app.command("inspect")
@guarded
def inspect_cmd(
    model: Annotated[str, typer.Argument(help="zoo name or .onnx / -symbol.json file")],
    recipe: Annotated[Path | None, typer.Option("--recipe", "-r", help="show what this recipe would do")] = None,
    weights: Annotated[Path | None, typer.Option("--weights", help="insightface backbone.pth")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override key.path=value")] = [],  # noqa: B006
    graph: Annotated[bool, typer.Option("--graph", help="print the traced FX graph")] = False,
) -> None:
    """Trace a model and show, per layer, what the recipe would quantize and at which width,
    before running anything."""
    from efquant_fx.graph.quantize import plan_layers
    from efquant_fx.graph.trace import trace
    from efquant_fx.models import load_model
    from efquant_fx.recipe import QuantConfig, load_recipe

    spec = load_recipe(recipe, set_) if recipe else load_recipe({"quant": {}}, set_)
    m = load_model(model, weights, **spec.model.kwargs)
    gm = trace(m, spec.model.leaf_modules)
    if graph:
        console.print(str(gm.graph), markup=False)
    quant = spec.quant or QuantConfig(enabled=False, layer_types=[])
    plans = plan_layers(gm, quant)
    table = Table(title=f"{model}: {len(plans)} compute layers"
                        + (f", recipe {spec.name}" if recipe else " (default recipe)"))
    for col in ("layer", "type", "params", "W bits", "A bits", "plan"):
        table.add_column(col)
    for name, p in plans.items():
        params = gm.get_submodule(name).weight.numel()
        table.add_row(name, p.type, f"{params:,}", str(p.weight_bits or "-"), str(p.act_bits or "-"),
                      ("quantize: " if p.quantize else "float: ") + p.reason)
    console.print(table)
    n_q = sum(p.quantize for p in plans.values())
    console.print(f"{n_q}/{len(plans)} layers would be quantized", markup=False)


@app.command("apply")
@guarded
def apply_cmd(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="zoo name or model file")] = None,
    weights: Annotated[Path | None, typer.Option("--weights", help="insightface backbone.pth")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="aligned faces: a folder or a list file",
                                              envvar="EFQUANT_DATA")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory")] = Path("runs/latest"),
    set_: Annotated[list[str], typer.Option("--set", help="override key.path=value")] = [],  # noqa: B006
    resume: Annotated[bool, typer.Option("--resume", help="continue a fine-tune from its last checkpoint")] = False,
) -> None:
    """Run a recipe end to end: load, compress, fine-tune, evaluate, export; write a run directory."""
    from efquant_fx.pipeline import check_writable, run_recipe
    from efquant_fx.recipe import load_recipe

    overrides = list(set_)
    if model:
        overrides.append(f"model.name={model}")
    if weights:
        overrides.append(f"model.weights={weights}")
    spec = load_recipe(recipe, overrides)
    if data is not None:
        spec = _with_data(spec, data)
    check_writable(out)
    report = run_recipe(spec, out_dir=out, resume=resume, progress=console.is_terminal)
    result = report.result
    console.print(result.table(max_rows=30))
    f = result.fidelity
    console.print(f"teacher-student embedding cosine on held-out images: mean {f['cosine_mean']:.4f}, "
                  f"worst {f['cosine_min']:.4f} ({f['images']} images)", markup=False)
    console.print(f"size: {result.size_bytes_before / 2**20:.2f} MiB -> {result.size_bytes_after / 2**20:.2f} MiB "
                  f"({result.size_ratio:.3f}x)", markup=False)
    if report.metrics:
        from efquant_fx.eval import compare_table

        metrics = report.metrics
        console.print(compare_table(metrics["teacher"], metrics["student"], names=["teacher", "compressed"]))
    for name, info in report.exports.items():
        console.print(f"exported {name}: {info}", markup=False)
    for note in result.notes:
        console.print(f"note: {note}", markup=False)
    console.print(f"run directory: {out}", markup=False)


def _with_data(spec, data: Path):
    """Point calibration (and fine-tuning) at the user's images."""
    from efquant_fx.recipe import load_recipe

    if data.is_dir():
        kind, extra = "folder", [f"calibration.data.root={data}"]
    elif data.is_file():
        kind, extra = "list", [f"calibration.data.list={data}", f"calibration.data.root={data.parent}"]
    else:
        raise EfquantError("not found", source=str(data), field="--data")
    overrides = [f"calibration.data.kind={kind}", *extra]
    if spec.finetune is not None:
        overrides += [o.replace("calibration.", "finetune.", 1) for o in overrides]
    return load_recipe(spec, overrides)


def run() -> None:  # pragma: no cover - console script entry
    sys.exit(app())


@app.command("quickstart")
@guarded
def quickstart_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="where the two runs go")] = Path("runs/quickstart"),
    data: Annotated[Path | None, typer.Option("--data", envvar="EFQUANT_DATA",
                                              help="aligned faces with finetune.txt + dev_pairs.bin")] = None,
) -> None:
    """The main job on the embedded SFace teacher: W8A8 and W4A4, fine-tuned, compared to the teacher."""
    from efquant_fx.quickstart import run_quickstart

    rows = run_quickstart(out, data, progress=console.is_terminal)
    table = Table(title="quickstart: SFace teacher vs compressed" + (" (held-out synthesized images)" if data is None
                                                                      else f" ({data})"))
    keys = sorted({k for r in rows.values() for k in r})
    table.add_column("metric")
    for variant in rows:
        table.add_column(variant.upper(), justify="right")
    for k in keys:
        table.add_row(k, *[f"{v:.4f}" if isinstance(v, float) else str(v) for v in (r.get(k) for r in rows.values())])
    console.print(table)
    console.print(f"written: {out}/summary.json and one run directory per variant", markup=False)
