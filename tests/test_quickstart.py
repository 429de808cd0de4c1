"""The README's quickstart, run the way a newcomer runs it: its command, in a fresh directory.

This is the slowest test of the suite (the whole data-free job, a few minutes on 2 CPU cores), and
the one that proves the front page of the project works.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_quickstart_commands() -> list[list[str]]:
    """The ``efquant-fx ...`` lines of the README's first bash block (install lines are the CI's job)."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no bash block"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.startswith("efquant-fx ")]


def test_readme_and_docs_give_the_same_quickstart_command():
    commands = readme_quickstart_commands()
    assert [c[:2] for c in commands] == [["efquant-fx", "quickstart"]]
    docs = (REPO / "docs" / "quickstart.md").read_text()
    assert shlex.join(commands[0]) in docs


@pytest.mark.slow
def test_quickstart_runs_from_the_readme_in_a_fresh_directory(tmp_path):
    (command,) = readme_quickstart_commands()
    exe = Path(sys.executable).with_name("efquant-fx")
    assert exe.is_file(), "the efquant-fx console script is not installed next to this python"
    env = {k: v for k, v in os.environ.items() if k not in ("EFQUANT_DATA", "EFQUANT_SHARED")}
    env["EFQUANT_SHARED"] = str(tmp_path / "no-shared")  # the quickstart must not need ../shared
    proc = subprocess.run([str(exe), *command[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / command[command.index("--out") + 1]
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    assert set(rows) == {"w8a8", "w4a4"}
    assert summary["data"].startswith("synthetic")
    # what docs/quickstart.md tells a user to expect (held-out synthesized images)
    assert rows["w8a8"]["cosine_mean"] >= 0.98
    assert rows["w8a8"]["pair_rank_spearman"] >= 0.95
    assert 0.4 <= rows["w4a4"]["cosine_mean"] < rows["w8a8"]["cosine_mean"]
    for row in rows.values():  # fine-tuning never returns a student worse than PTQ on the held-out batch
        assert row["finetuned_cosine_heldout_calibration"] >= row["ptq_cosine_heldout_calibration"] - 1e-6
    assert rows["w8a8"]["size_mib"] < rows["w8a8"]["teacher_size_mib"] / 3
    for variant in rows:  # each variant left a complete run directory
        assert {"recipe.yaml", "compression.json", "model.pt"} <= {p.name for p in (out / variant).iterdir()}
    assert "W8A8" in proc.stdout and "W4A4" in proc.stdout
    assert "graph pass" in proc.stderr and "fine-tune: step" in proc.stderr  # piped: progress as log lines
    for variant in rows:  # issue 16, item 1: the quickstart's runs export (synthetic images from the cache)
        exported = subprocess.run([str(exe), "export", str(out / variant)], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=900)
        assert exported.returncode == 0, exported.stderr[-3000:]
        assert "without weights" not in exported.stdout + exported.stderr  # SFace is pretrained
        assert "fast_hadamard_transform" not in exported.stderr
        assert (out / variant / "export" / "export.json").is_file()


@pytest.mark.parametrize("args, needle", [
    (["quickstart", "--data", "/nonexistent/faces"], "/nonexistent/faces"),
])
def test_quickstart_bad_data_folder_is_one_line_exit_2(tmp_path, args, needle):
    from typer.testing import CliRunner

    from efquant_fx.cli import app

    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "q")])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0]
