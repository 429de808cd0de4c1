import json
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from efquant_fx.cli import app, parse_eval_spec
from tests.test_pipeline import make_faces

REPO = Path(__file__).resolve().parents[1]

runner = CliRunner()


def test_help_lists_commands():
    out = runner.invoke(app, ["--help"]).output
    for cmd in ("apply", "eval", "export", "inspect", "models", "recipes"):
        assert cmd in out


def test_console_script_installed():
    proc = subprocess.run([sys.executable, "-m", "efquant_fx", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "apply" in proc.stdout


def test_bad_recipe_exit_2_one_line(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("quant: {weight_bits: 99}\n")
    res = runner.invoke(app, ["recipes", "validate", str(bad)])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [f"error: {bad}: quant.weight_bits: Input should be less than or "
                                               f"equal to 8 (got 99)"]


def test_inspect_shows_plan_without_running():
    res = runner.invoke(app, ["inspect", "mobilefacenet", "--set", "quant.weight_bits=4",
                              "--set", r"quant.exclude=['^features']"])
    assert res.exit_code == 0, res.output
    assert "48/50 layers would be quantized" in res.output  # GDC conv + linear excluded


def test_unknown_model_exit_2():
    res = runner.invoke(app, ["inspect", "resnet9000"])
    assert res.exit_code == 2 and "unknown model 'resnet9000'" in res.output


# --- eval / export on a saved run ---------------------------------------------------------------------


def one_error_line(res) -> str:
    """The whole output of a refused command: exit code 2 and exactly one ``error:`` line."""
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """`apply` of a W8A8 mobilefacenet (zoo name, random init and calibration), packed export on."""
    tmp = tmp_path_factory.mktemp("cli_run")
    recipe = {"name": "tiny_mbf", "device": "cpu", "model": {"name": "mobilefacenet", "random_weights": True},
              "quant": {"weight_bits": 8, "act_bits": 8}, "calibration": {"images": 8, "batch_size": 4},
              "export": {"formats": ["packed"]}}
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    res = runner.invoke(app, ["apply", str(tmp / "recipe.yaml"), "--out", str(tmp / "run")])
    assert res.exit_code == 0, res.output
    return tmp / "run", res.output


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    make_faces(root)
    return root


def test_apply_lists_exported_files(run_dir):
    run, output = run_dir
    size = (run / "export" / "model_packed.npz").stat().st_size
    assert "model_packed.npz" in output and f"{size:,}" in output and "exact on reload" in output


def test_eval_run_directory_teacher_vs_compressed(run_dir, faces, tmp_path):
    run, _ = run_dir
    spec = f"pairs:pairs={faces / 'pairs.txt'},root={faces},n_folds=2"
    res = runner.invoke(app, ["eval", str(run), "--eval", spec, "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(metrics["results"]) == {"teacher", "student"}
    assert "acc" in metrics["results"]["student"]["pairs"]["metrics"]
    assert "compressed" in res.output and "pairs" in res.output


def test_eval_plain_model_with_recipe_eval_section(faces, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"device": "cpu", "eval": [
        {"name": "pairs", "pairs": str(faces / "pairs.txt"), "root": str(faces), "n_folds": 2}]}))
    res = runner.invoke(app, ["eval", "mobilefacenet", "--recipe", str(recipe), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(metrics["results"]) == {"model"} and "pairs" in metrics["results"]["model"]


def test_eval_spec_forms():
    assert parse_eval_spec("lfw_bin:path=/x/lfw.bin,n_folds=3,flip=false") == {
        "name": "lfw_bin", "path": "/x/lfw.bin", "n_folds": 3, "flip": False}
    assert parse_eval_spec("{name: pairs, pairs: p.txt, root: faces}") == {
        "name": "pairs", "pairs": "p.txt", "root": "faces"}
    assert parse_eval_spec("dense") == {"name": "dense"}


def test_export_run_directory(run_dir, tmp_path):
    run, _ = run_dir
    out = tmp_path / "exp"
    res = runner.invoke(app, ["export", str(run), "--format", "packed", "--format", "onnx_float", "--opset", "14",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["files"] == {"packed": "model_packed.npz", "onnx_float": "teacher_fp32.onnx"}
    assert manifest["reports"]["onnx_float"]["opset"] == 14
    assert manifest["reports"]["packed"]["max_abs_diff"] == 0.0
    for name in ("model_packed.npz", "teacher_fp32.onnx"):
        assert name in res.output and f"{(out / name).stat().st_size:,}" in res.output
    assert "exact on reload" in res.output and "vs teacher" in res.output


def test_export_int8_onnx_says_what_it_added(run_dir, tmp_path):
    """This run's recipe has no compute_output points: export adds them, and must say so."""
    run, _ = run_dir
    res = runner.invoke(app, ["export", str(run), "--format", "onnx_qcdq", "--out", str(tmp_path / "exp")])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "exp" / "export.json").read_text())
    added = manifest["reports"]["onnx_qcdq"]["added_output_points"]
    assert added > 0
    assert f"note: onnx_qcdq: added {added} 8-bit requantization points" in res.output
    assert "compute_output" in res.output


@pytest.fixture
def broken_run(run_dir, tmp_path):
    """A copy of the run whose files a test may damage."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir[0], copy, ignore=shutil.ignore_patterns("export", "eval"))
    return copy


@pytest.mark.parametrize(("args", "expected"), [
    (["eval", "runs/does-not-exist", "--eval", "{pairs}"], "runs/does-not-exist: no such run directory"),
    (["eval", "resnet9000", "--eval", "{pairs}", "--out", "{tmp}/ev"], "unknown model 'resnet9000'"),
    (["eval", "mobilefacenet"], "--eval: no evaluators"),
    (["eval", "{run}", "--eval", "not a spec"], "--eval: 'not a spec': expected NAME:key=value"),
    (["eval", "{run}", "--eval", "{name: [oops"], "--eval: '{name: [oops': malformed inline mapping"),
    (["eval", "{run}", "--eval", "megaface:path=x"], "unknown evaluator 'megaface'"),
    (["eval", "{run}", "--eval", "lfw_bin:path=/no/lfw.bin"], "/no/lfw.bin: path: verification pack not found"),
    (["eval", "{run}", "--eval", "pairs:pairs=/no/pairs.txt"], "/no/pairs.txt: pairs: pairs file not found"),
    (["eval", "{run}"], "the run's recipe has no eval: section"),
    (["eval", "{run}", "--model", "resnet9000", "--eval", "{pairs}"], "unknown model 'resnet9000'"),
    (["export", "{run}", "--format", "tflite"], "--format: unknown format 'tflite'"),
    (["export", "{run}", "--opset", "9"], "--opset: must be >= 13"),
    (["export", "runs/does-not-exist"], "runs/does-not-exist: run directory not found"),
    (["export", "{run}", "--model", "resnet9000"], "unknown model 'resnet9000'"),
])
def test_eval_export_bad_arguments_exit_2_one_line(broken_run, faces, tmp_path, args, expected):
    pairs = f"pairs:pairs={faces / 'pairs.txt'},n_folds=2"
    args = [a.replace("{run}", str(broken_run)).replace("{pairs}", pairs).replace("{tmp}", str(tmp_path))
            for a in args]
    res = runner.invoke(app, args)
    assert expected in one_error_line(res)
    assert not (tmp_path / "ev").exists()  # refused before writing anything


@pytest.mark.parametrize(("fname", "content", "expected"), [
    ("model.pt", None, "run: this run did not finish: no model.pt; rerun efquant-fx apply"),
    ("model.pt", b"not a checkpoint", "model.pt: not a torch.save() state dict"),
    ("recipe.yaml", b"quant: {weight_bits: [\n", "recipe.yaml: line 2, column 1: malformed YAML"),
    ("recipe.yaml", b"quant: {weight_bits: eight}\n", "recipe.yaml: quant.weight_bits: Input should be a valid"),
])
@pytest.mark.parametrize("command", ["eval", "export"])
def test_damaged_run_directory_exit_2_one_line(broken_run, faces, command, fname, content, expected):
    if content is None:
        (broken_run / fname).unlink()
    else:
        (broken_run / fname).write_bytes(content)
    extra = ["--eval", f"pairs:pairs={faces / 'pairs.txt'}"] if command == "eval" else ["--format", "packed"]
    res = runner.invoke(app, [command, str(broken_run), *extra])
    assert expected in one_error_line(res)


def test_eval_bad_recipe_exit_2_one_line(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("eval: 5\n")
    res = runner.invoke(app, ["eval", "mobilefacenet", "--recipe", str(bad)])
    assert f"{bad}: eval: Input should be a valid list" in one_error_line(res)
    bad.write_text("eval: [\n")
    res = runner.invoke(app, ["eval", "mobilefacenet", "--recipe", str(bad)])
    assert "malformed YAML" in one_error_line(res)


# --- the typed export: section ------------------------------------------------------------------------


def test_export_section_is_typed(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("export:\n  formats: [onnx_qcdq, packed, torch_int8]\n")  # as docs/tutorial.md shows it
    assert runner.invoke(app, ["recipes", "validate", str(good)]).exit_code == 0
    for text, expected in [("export: {formats: [tflite]}", "export.formats.0: Input should be 'onnx_qcdq'"),
                           ("export: {opset: eleven}", "export.opset: Input should be a valid integer"),
                           ("export: {dpi: 3}", "export.dpi: unknown field")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text + "\n")
        res = runner.invoke(app, ["recipes", "validate", str(bad)])
        assert expected in one_error_line(res), text


def test_export_config_matches_export_model():
    """The recipe section mirrors export_model()'s keyword arguments and formats (kept apart so that
    reading a recipe does not import torch-heavy exporters)."""
    import inspect

    from efquant_fx.export import FORMATS, export_model
    from efquant_fx.recipe import ExportConfig, ExportFormat

    assert set(typing.get_args(ExportFormat)) == set(FORMATS)
    params = inspect.signature(export_model).parameters
    for name, field in ExportConfig.model_fields.items():
        default = field.get_default(call_default_factory=True)
        assert name in params, name
        expected = params[name].default
        assert (list(expected) if isinstance(expected, tuple) else expected) == default, name


def test_data_option_replaces_the_recipes_image_source_and_keeps_its_subset(tmp_path):
    from efquant_fx.recipe import load_recipe, with_image_source

    spec = load_recipe("mobilefacenet_w6a6")  # a shipped recipe by name: list-file data with max_images
    faces = tmp_path / "faces"
    faces.mkdir()
    out = with_image_source(spec, faces)
    for section in (out.calibration, out.finetune):
        assert section.data.kind == "folder" and section.data.root == str(faces) and section.data.list is None
    assert out.finetune.data.max_images == spec.finetune.data.max_images
    listfile = tmp_path / "train.txt"
    listfile.write_text("a.jpg\t0\n")
    assert with_image_source(spec, listfile).finetune.data.list == str(listfile)


# --- first contact (issue 16) -------------------------------------------------------------------------


def test_export_of_a_run_calibrated_on_synthetic_images(tmp_path):
    """The quickstart's runs calibrate on images synthesized from the teacher: export rebuilds them
    (from the cache) with the reloaded teacher, and says nothing false about its weights."""
    recipe = {"name": "tiny_synth", "device": "cpu", "model": {"name": "mobilefacenet", "random_weights": True},
              "quant": {"weight_bits": 8, "act_bits": 8},
              "calibration": {"images": 8, "batch_size": 4,
                              "data": {"kind": "synthetic", "n": 8, "steps": 1, "cache": str(tmp_path / "synth")}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    assert runner.invoke(app, ["apply", str(tmp_path / "r.yaml"), "--out", str(run)]).exit_code == 0
    res = runner.invoke(app, ["export", str(run), "--format", "packed"])
    assert res.exit_code == 0, res.output
    assert (run / "export" / "model_packed.npz").is_file()


def test_a_failed_export_or_eval_leaves_no_empty_folder(broken_run, faces):
    (broken_run / "model.pt").unlink()
    res = runner.invoke(app, ["export", str(broken_run), "--format", "packed"])
    assert "did not finish" in one_error_line(res)
    assert not (broken_run / "export").exists()
    res = runner.invoke(app, ["eval", str(broken_run), "--eval", f"pairs:pairs={faces / 'pairs.txt'},root={faces}"])
    assert "did not finish" in one_error_line(res)
    assert not (broken_run / "eval").exists()


def test_a_bad_set_value_is_reported_against_set_not_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quant: {colour: 1}\n")
    res = runner.invoke(app, ["recipes", "validate", str(recipe), "--set", "calibration.images=lots"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"error: {recipe}: quant.colour: unknown field (check the spelling; see the recipe reference)",
        "error: --set: calibration.images: Input should be a valid integer, unable to parse string as an integer "
        "(got 'lots')"]


def test_recipes_validate_refuses_an_unknown_model_name(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: mobilefacenett}\n")
    line = one_error_line(runner.invoke(app, ["recipes", "validate", str(recipe)]))
    assert line.startswith(f"error: {recipe}: model.name: unknown model 'mobilefacenett'; known models: ")
    line = one_error_line(runner.invoke(app, ["recipes", "validate", str(recipe), "--set", "model.name=r9000"]))
    assert line.startswith("error: --set: model.name: unknown model 'r9000'")
    for ok in ("mobilefacenet", "my/model.onnx"):
        assert runner.invoke(app, ["recipes", "validate", str(recipe), "--set", f"model.name={ok}"]).exit_code == 0


def test_piped_tables_are_not_cut_to_80_columns():
    res = runner.invoke(app, ["inspect", "mobilefacenet", "--set", "quant.weight_bits=4",
                              "--set", r"quant.exclude=['^features']"])
    assert res.exit_code == 0, res.output
    assert "…" not in res.stdout  # no layer name or reason shortened
    row = next(line for line in res.stdout.splitlines() if "features.layers.0.layers.0 " in line)
    assert "float: quant.exclude '^features'" in row


def test_help_names_what_options_take_not_python_types():
    for args in (["--help"], ["apply", "--help"], ["export", "--help"]):
        out = runner.invoke(app, args).output
        assert "<bool>" not in out and "<list[str]>" not in out, out
    out = runner.invoke(app, ["apply", "--help"]).output
    assert "--set KEY=VALUE" in out and "--overwrite" in out


# --- shipped recipes (issue 16, item 8) ---------------------------------------------------------------


def test_recipes_ship_inside_the_package():
    """The wheel's package-data pattern must match real files: recipes/ used to sit beside the package."""
    from efquant_fx.recipe import SHIPPED_RECIPES, shipped_recipes

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    assert SHIPPED_RECIPES.parent == REPO / "efquant_fx"
    assert {"quickstart_w8a8", "quickstart_w4a4", "mobilefacenet_w8a8"} <= set(shipped_recipes())
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["efquant_fx"]
    packaged = {p for pattern in patterns for p in (REPO / "efquant_fx").glob(pattern)}
    assert set(shipped_recipes().values()) <= packaged
    top = REPO / "recipes"  # one copy only: a top-level recipes/ may only point at the shipped one
    assert not top.exists() or top.resolve() == SHIPPED_RECIPES


def test_recipes_list_and_show():
    from efquant_fx.recipe import SHIPPED_RECIPES

    res = runner.invoke(app, ["recipes", "list"])
    assert res.exit_code == 0, res.output
    assert "quickstart_w4a4" in res.stdout and "mobilefacenet_w8a8" in res.stdout and "W8A8" in res.stdout
    res = runner.invoke(app, ["recipes", "show", "mobilefacenet_w8a8"])
    assert res.exit_code == 0 and res.stdout == (SHIPPED_RECIPES / "mobilefacenet_w8a8.yaml").read_text()
    line = one_error_line(runner.invoke(app, ["recipes", "show", "mobilefacenet_w9a9"]))
    assert line.startswith("error: unknown recipe 'mobilefacenet_w9a9'; shipped: ")


def test_a_shipped_recipe_is_taken_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here: a non-editable install's view
    res = runner.invoke(app, ["recipes", "validate", "quickstart_w8a8", "mobilefacenet_w4a4.yaml"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["inspect", "mobilefacenet", "--recipe", "mobilefacenet_w4a8"])
    assert res.exit_code == 0 and "recipe mobilefacenet_w4a8" in res.output
    args = ["apply", "mobilefacenet_w8a8", "--out", "run", "--set", "calibration.data={kind: random}",
            "--set", "calibration.images=8", "--set", "calibration.batch_size=4", "--set", "device=cpu"]
    line = one_error_line(runner.invoke(app, args))  # no --weights: random weights only when asked for
    assert "zoo model 'mobilefacenet' has no trained weights" in line and "--random-weights" in line
    assert not (tmp_path / "run").exists()  # nothing left behind: the same --out takes the next try
    res = runner.invoke(app, [*args, "--random-weights"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "model.pt").is_file()
    (tmp_path / "mobilefacenet_w8a8.yaml").write_text("name: mine\n")  # a file of that name wins
    assert "(mine," in runner.invoke(app, ["recipes", "validate", "mobilefacenet_w8a8.yaml"]).output
    line = one_error_line(runner.invoke(app, ["recipes", "validate", "recipes/mobilefacenet_w8a8.yaml"]))
    assert line == ("error: recipes/mobilefacenet_w8a8.yaml: file not found (nor the name of a shipped recipe: "
                    "efquant-fx recipes list)")
