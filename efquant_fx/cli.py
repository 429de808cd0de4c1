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

# plain click help (rich_markup_mode=None): typer's rich help labels every flag "<bool>" and every
# repeatable option "<list[str]>"; the metavars below name what each option takes instead
app = typer.Typer(help="Compress face-recognition backbones to low bit widths with small data.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
recipes_app = typer.Typer(help="Work with recipe files.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(recipes_app, name="recipes")

console = Console(stderr=False, no_color=bool(os.environ.get("NO_COLOR")) or None)
err_console = Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")) or None)
_state = {"verbose": False}


def print_table(table: Any) -> None:
    """A table on stdout, whole: off a terminal (a pipe, a file) rich would cut it to 80 columns and
    shorten layer names with an ellipsis, so it gets the width its content needs instead."""
    if console.is_terminal:
        console.print(table)
        return
    from rich.measure import Measurement

    width = Measurement.get(console, console.options.update_width(10_000), table).maximum
    Console(width=max(width, 20), no_color=bool(os.environ.get("NO_COLOR")) or None).print(table)


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
def main(ctx: typer.Context,
         verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show tracebacks on failure")] = False):
    """Progress goes to stderr: bars on a terminal, and plain log lines (stage, step, rate, ETA)
    when stderr is a pipe or a file, so a logged run is never silent; stdout keeps the results."""
    import warnings

    from efquant_fx.logs import log_to_stderr

    # brevitas.graph warns on first import that an optional CUDA package for Hadamard rotations is
    # missing; no recipe uses rotations, so it only alarmed users of apply and export
    warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found", category=UserWarning)
    _state["verbose"] = verbose
    ctx.call_on_close(log_to_stderr())


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
    print_table(table)
    console.print("Also accepted: an .onnx face model, an MXNet '-symbol.json', or any nn.Module from Python.")


@recipes_app.command("validate")
@guarded
def recipes_validate(
    files: Annotated[list[Path], typer.Argument(metavar="RECIPE", help="recipe YAML files or shipped recipe "
                                                "names")],
    set_: Annotated[list[str], typer.Option("--set", metavar="KEY=VALUE", help="override key.path=value")] = [],  # noqa: B006
) -> None:
    """Validate recipes; print each problem as 'file: field: expected ...'."""
    from efquant_fx.errors import RecipeError
    from efquant_fx.recipe import load_recipe

    problems: list[str] = []
    for f in files:
        try:
            r = load_recipe(f, set_)
        except RecipeError as exc:
            problems += exc.problems
            continue
        unknown = _unknown_model(r.model.name, str(f), set_)
        if unknown:
            problems.append(unknown)
        else:
            console.print(f"{f}: ok ({r.name}, hash {r.hash})", markup=False)
    if problems:
        raise RecipeError(problems)


def _unknown_model(name: str | None, source: str, overrides: list[str]) -> str | None:
    """``model.name`` that is neither a zoo name nor a model file: the schema takes any text, so a
    typo would only surface once a run starts loading the model."""
    from efquant_fx.models import list_models

    if name is None or name in list_models() or Path(name).suffix.lower() in (".onnx", ".json"):
        return None
    if any(o.partition("=")[0].strip() in ("model", "model.name") for o in overrides):
        source = "--set"
    return (f"{source}: model.name: unknown model {name!r}; known models: {', '.join(list_models())} "
            "(or an .onnx / -symbol.json file)")


@recipes_app.command("list")
@guarded
def recipes_list() -> None:
    """List the recipes that ship with efquant-fx (apply, inspect --recipe and eval --recipe take their names)."""
    from efquant_fx.recipe import load_recipe, shipped_recipes

    table = Table(title="shipped recipes (efquant-fx recipes show NAME)")
    for col in ("name", "model", "W/A bits", "fine-tune", "description"):
        table.add_column(col)
    for name, path in shipped_recipes().items():
        r = load_recipe(path)
        q = r.quant
        bits = f"W{q.weight_bits}A{q.act_bits}" if q is not None and q.enabled else "float"
        table.add_row(name, r.model.name or "-", bits, f"{r.finetune.steps} steps" if r.finetune else "-",
                      r.description or _first_comment(path))
    print_table(table)


def _first_comment(path: Path) -> str:
    """The recipe file's opening comment line: what most shipped recipes say about themselves."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


@recipes_app.command("show")
@guarded
def recipes_show(name: Annotated[str, typer.Argument(metavar="NAME", help="a name from efquant-fx recipes list")]):
    """Print a shipped recipe, comments included: a start for your own (efquant-fx recipes show NAME > my.yaml)."""
    from efquant_fx.recipe import shipped_recipes

    shipped = shipped_recipes()
    path = shipped.get(name.removesuffix(".yaml"))
    if path is None:
        raise EfquantError(f"unknown recipe {name!r}; shipped: {', '.join(shipped)}")
    sys.stdout.write(path.read_text(encoding="utf-8"))


@app.command("inspect")
@guarded
def inspect_cmd(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="zoo name or .onnx / -symbol.json file")],
    recipe: Annotated[Path | None, typer.Option("--recipe", "-r", metavar="RECIPE",
                                                help="show what this recipe (a file or a shipped "
                                                "recipe's name) would do")] = None,
    weights: Annotated[Path | None, typer.Option("--weights", metavar="FILE", help="insightface backbone.pth")] = None,
    set_: Annotated[list[str], typer.Option("--set", metavar="KEY=VALUE", help="override key.path=value")] = [],  # noqa: B006
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
    print_table(table)
    n_q = sum(p.quantize for p in plans.values())
    console.print(f"{n_q}/{len(plans)} layers would be quantized", markup=False)
    if quant.budget is not None:
        console.print(f"quant.budget: the layers raised to {quant.budget.high_bits} bits are chosen when compressing "
                      "(measured sensitivity on calibration faces); shown here at the recipe's own bits",
                      markup=False)


@app.command("apply")
@guarded
def apply_cmd(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="recipe YAML file, or the name of a shipped "
                                           "recipe (efquant-fx recipes list)")],
    model: Annotated[str | None, typer.Option("--model", "-m", metavar="MODEL", help="zoo name or model file")] = None,
    weights: Annotated[Path | None, typer.Option("--weights", metavar="FILE", help="insightface backbone.pth")] = None,
    data: Annotated[Path | None, typer.Option("--data", metavar="PATH", help="aligned faces: a folder or a list file",
                                              envvar="EFQUANT_DATA")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="run directory")] = Path("runs/latest"),
    set_: Annotated[list[str], typer.Option("--set", metavar="KEY=VALUE", help="override key.path=value")] = [],  # noqa: B006
    resume: Annotated[bool, typer.Option("--resume", help="continue the fine-tune of the run in --out (same "
                                         "recipe) from its last checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the run already in --out (its files "
                                            "are deleted first)")] = False,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="compress a zoo model with random "
                                                 "weights on purpose (smoke tests); without it a zoo name needs "
                                                 "--weights")] = False,
) -> None:
    """Run a recipe end to end: load, compress, fine-tune, evaluate, export; write a run directory
    (--out must be empty, unless --resume or --overwrite)."""
    from efquant_fx.files import check_writable
    from efquant_fx.pipeline import run_recipe
    from efquant_fx.recipe import load_recipe, with_image_source

    overrides = list(set_)
    if model:
        overrides.append(f"model.name={model}")
    if weights:
        overrides.append(f"model.weights={weights}")
    if random_weights:
        overrides.append("model.random_weights=true")
    spec = load_recipe(recipe, overrides)
    if data is not None:
        spec = with_image_source(spec, data)
    check_writable(out, keep=False)  # before any work; run_recipe makes the folder (and removes it on failure)
    report = run_recipe(spec, out_dir=out, resume=resume, overwrite=overwrite, progress=console.is_terminal)
    result = report.result
    print_table(result.table(max_rows=30))
    f = result.fidelity
    where = "held-out images" if f.get("held_out", True) else "the calibration images (none held out)"
    console.print(f"teacher-student embedding cosine on {where}: mean {f['cosine_mean']:.4f}, "
                  f"worst {f['cosine_min']:.4f} ({f['images']} images)", markup=False)
    console.print(f"size: {result.size_bytes_before / 2**20:.2f} MiB -> {result.size_bytes_after / 2**20:.2f} MiB "
                  f"({result.size_ratio:.3f}x)", markup=False)
    if report.metrics:
        from efquant_fx.eval import compare_table

        metrics = report.metrics
        print_table(compare_table(metrics["teacher"], metrics["student"], names=["teacher", "compressed"]))
    if report.exports:
        print_table(_export_table(report.exports, title=f"exported to {out / 'export'}"))
        _print_export_notes(report.exports)
    for note in result.notes:
        console.print(f"note: {note}", markup=False)
    console.print(f"run directory: {out}", markup=False)


EVAL_SPEC_HELP = ("evaluator, repeatable: NAME:key=value,key=value (values read like --set: numbers, true/false), "
                  "e.g. lfw_bin:path=/data/lfw.bin, or an inline mapping '{name: pairs, pairs: p.txt, root: faces}'; "
                  "default: the recipe's eval: section")


def parse_eval_spec(text: str) -> dict[str, Any]:
    """``NAME:key=value,...`` or an inline YAML/JSON mapping -> one recipe ``eval:`` entry."""
    import yaml

    from efquant_fx.recipe import load_yaml  # safe_load with limits on depth and alias expansion

    text = text.strip()
    if text.startswith("{"):
        try:
            entry = load_yaml(text)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise EfquantError(f"{text!r}: malformed inline mapping ({problem})", field="--eval") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise EfquantError(f"{text!r}: an inline mapping needs a name, e.g. {{name: lfw_bin, path: lfw.bin}}",
                               field="--eval")
        return entry
    name, _, rest = text.partition(":")
    if not name.strip() or any(c in name for c in " =,{}"):
        raise EfquantError(f"{text!r}: expected NAME:key=value,... or an inline {{name: ..., ...}} mapping",
                           field="--eval")
    entry: dict[str, Any] = {"name": name.strip()}
    for item in rest.split(",") if rest.strip() else []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise EfquantError(f"{text!r}: {item!r} is not key=value", field="--eval")
        try:
            value = load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        entry[key.strip()] = value
    return entry


@app.command("eval")
@guarded
def eval_cmd(
    target: Annotated[str, typer.Argument(metavar="TARGET", help="run directory (from apply), or a zoo name / .onnx / "
                                               "-symbol.json model to evaluate alone")],
    recipe: Annotated[Path | None, typer.Option("--recipe", "-r", metavar="RECIPE", help="take the eval: section "
                                                "(and, for a plain model, model settings and device) from this "
                                                "recipe")] = None,
    weights: Annotated[Path | None, typer.Option("--weights", metavar="FILE", help="float weights: the teacher's "
                                                 "for a run directory, the model's otherwise")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", metavar="MODEL", help="run directory only: the teacher "
                                              "architecture, when the recipe names none")] = None,
    evals: Annotated[list[str], typer.Option("--eval", "-e", metavar="SPEC", help=EVAL_SPEC_HELP)] = [],  # noqa: B006
    out: Annotated[Path | None, typer.Option("--out", "-o", metavar="DIR", help="where metrics.json and roc.png go "
                                             "(default: RUN_DIR/eval, or runs/eval/MODEL)")] = None,
) -> None:
    """Evaluate a run's compressed model next to its teacher (or a plain model alone); write metrics.json."""
    from efquant_fx.eval import compare_table
    from efquant_fx.pipeline import prepare_eval, run_eval

    job = prepare_eval(target, recipe=recipe, evals=[parse_eval_spec(e) for e in evals] or None, weights=weights,
                       model=model, out=out)
    for note in job.notes:
        console.print(f"note: {note}", markup=False)
    results = run_eval(job, progress=console.is_terminal)
    print_table(compare_table(*results.values(), names=job.names, title=f"{target}: " + " vs ".join(job.names)))
    console.print(f"metrics: {job.out / 'metrics.json'}", markup=False)


def _print_reload_notes(result: Any) -> None:
    for note in result.notes:
        if note.startswith("reload: "):
            console.print(f"note: {note.removeprefix('reload: ')}", markup=False)


def _parity(report: Any) -> str:
    """One cell: how close an exported file is to the model it came from."""
    if isinstance(report, dict):
        return f"skipped: {report.get('skipped', report)}"
    if getattr(report, "kind", None) == "float" and report.cosine:
        return f"cosine {min(report.cosine.values()):.4f} vs teacher"
    vs_compressed = getattr(report, "cosine_vs_compressed", None)
    if isinstance(vs_compressed, dict):
        vs_compressed = min(vs_compressed.values()) if vs_compressed else None
    if vs_compressed is not None:
        return f"cosine {vs_compressed:.4f} vs compressed"
    diff = getattr(report, "max_abs_diff", None)
    if diff is not None:
        return "exact on reload" if diff == 0 else f"max |diff| {diff:.2g} on reload"
    return "-"


def _export_table(reports: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    table.add_column("format")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    table.add_column("MiB", justify="right")
    table.add_column("parity")
    for fmt, rep in reports.items():
        if fmt == "manifest":
            continue
        if isinstance(rep, dict):
            table.add_row(fmt, "-", "-", "-", _parity(rep))
        else:
            table.add_row(fmt, Path(rep.path).name, f"{rep.bytes:,}", f"{rep.bytes / 2**20:.2f}", _parity(rep))
    return table


def _print_export_notes(reports: dict[str, Any]) -> None:
    """What export did beyond writing the file (added points, folded BNs, float PReLUs), one line each."""
    for fmt, rep in reports.items():
        for note in getattr(rep, "notes", None) or []:
            console.print(f"note: {fmt}: {note}", markup=False, soft_wrap=True)


@app.command("export")
@guarded
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR",
                                            help="run directory written by apply (recipe.yaml + model.pt)")],
    formats: Annotated[list[str], typer.Option("--format", "-f", metavar="FORMAT", help="repeatable: onnx_qcdq, "
                                               "onnx_float, packed, torch_int8 (default: the recipe's export: "
                                               "section, else onnx_qcdq, packed, torch_int8)")] = [],  # noqa: B006
    out: Annotated[Path | None, typer.Option("--out", "-o", metavar="DIR",
                                             help="folder (default: RUN_DIR/export)")] = None,
    opset: Annotated[int | None, typer.Option("--opset", metavar="N", help="ONNX opset, >= 13 (default: the recipe's, "
                                              "else 13)")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", metavar="MODEL", help="the teacher architecture, "
                                              "when the recipe names none")] = None,
    weights: Annotated[Path | None, typer.Option("--weights", metavar="FILE", help="the teacher's float weights "
                                                 "(onnx_float, torch_int8 parity)")] = None,
) -> None:
    """Reload a run directory and write deployable files (int8 ONNX, packed weights, torch int8)."""
    from efquant_fx.pipeline import export_run

    result, out, reports = export_run(run_dir, out, formats=formats, opset=opset, model=model, weights=weights)
    _print_reload_notes(result)
    print_table(_export_table(reports, title=f"{run_dir} -> {out}"))
    _print_export_notes(reports)
    console.print(f"manifest: {reports['manifest']}", markup=False)


def run() -> None:  # pragma: no cover - console script entry
    sys.exit(app())


@app.command("quickstart")
@guarded
def quickstart_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR",
                                      help="where the two runs go")] = Path("runs/quickstart"),
    data: Annotated[Path | None, typer.Option("--data", metavar="PATH", envvar="EFQUANT_DATA",
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
    print_table(table)
    console.print(f"written: {out}/summary.json and one run directory per variant", markup=False)
