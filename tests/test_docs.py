import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_recipe_reference_is_current():
    proc = subprocess.run([sys.executable, "scripts/gen_recipe_reference.py", "--check"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
