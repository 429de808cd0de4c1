"""``benchmarks/eval_teacher.py`` runs end to end on a miniature copy of the LFW-112 layout."""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import pytest

from tests.eval.eval_helpers import TinyNet, face_like, save_png

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "eval_teacher.py"


def _script():
    spec = importlib.util.spec_from_file_location("eval_teacher_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mini_shared(tmp_path: Path) -> Path:
    lfw = tmp_path / "shared" / "data" / "lfw112"
    people = {f"P{k}_X": k for k in range(6)}
    for name, k in people.items():
        for n in (1, 2, 3):
            save_png(
                lfw / "images" / name / f"{name}_{n:04d}.jpg", face_like(k, noise=20, noise_seed=10 * k + n)
            )
    lines, bins, issame = ["3\t2"], [], []
    names = list(people)
    for fold in range(3):
        a, b = names[2 * fold], names[2 * fold + 1]
        for name1, n1, name2, n2 in ((a, 1, a, 2), (b, 2, b, 3), (a, 1, b, 1), (b, 2, names[0], 3)):
            same = name1 == name2
            lines.append(f"{name1}\t{n1}\t{n2}" if same else f"{name1}\t{n1}\t{name2}\t{n2}")
            for nm, n in ((name1, n1), (name2, n2)):
                bins.append((lfw / "images" / nm / f"{nm}_{n:04d}.jpg").read_bytes())
            issame.append(same)
    (lfw / "dev_pairs.txt").write_text("\n".join(lines) + "\n")
    (lfw / "dev_pairs.bin").write_bytes(pickle.dumps((bins, issame)))
    return tmp_path / "shared"


def test_eval_teacher_script_writes_json_and_plot(tmp_path):
    script = _script()
    out = tmp_path / "results" / "eval_teacher.json"
    roc = tmp_path / "results" / "roc.png"
    script.run(TinyNet(0), _mini_shared(tmp_path), out, roc=roc, model_ref="tiny", progress=False)
    doc = json.loads(out.read_text())
    res = doc["results"]["model"]
    assert set(res) == {"lfw_dev_3fold", "lfw_dev_dense"}
    assert res["lfw_dev_3fold"]["info"]["n_folds"] == 3 and res["lfw_dev_3fold"]["info"]["n_pairs"] == 12
    assert (
        res["lfw_dev_dense"]["info"]["n_images"] == 18 and "tar@far=1e-2" in res["lfw_dev_dense"]["metrics"]
    )
    assert doc["extra"]["machine"]["cpu_count"] and doc["extra"]["wall_s"]["lfw_dev_dense"] >= 0
    assert roc.is_file()


def test_eval_teacher_script_user_errors_exit_2(tmp_path, capsys):
    script = _script()
    assert script.main(["--model", "no_such_model", "--shared", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main([])
