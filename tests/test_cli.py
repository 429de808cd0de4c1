import subprocess
import sys

from typer.testing import CliRunner

from efquant_fx.cli import app

runner = CliRunner()


def test_help_lists_commands():
    out = runner.invoke(app, ["--help"]).output
    for cmd in ("apply", "inspect", "models", "recipes"):
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
