"""`efquant-fx apply` end to end on a tiny generated face set: compress, fine-tune, evaluate."""

import json

import yaml
from typer.testing import CliRunner

from efquant_fx.cli import app
from tests.eval.eval_helpers import face_like, save_png

runner = CliRunner()


def make_faces(root, identities=6, per_identity=3):
    for i in range(identities):
        for j in range(per_identity):
            save_png(root / f"id{i}" / f"{j}.png", face_like(i, noise=12.0, noise_seed=i * 10 + j))
    pairs = [f"id{i}/0.png id{i}/1.png 1" for i in range(identities)]
    pairs += [f"id{i}/0.png id{(i + 1) % identities}/2.png 0" for i in range(identities)]
    (root / "pairs.txt").write_text("\n".join(pairs) + "\n")


def test_apply_writes_a_complete_run_directory(tmp_path):
    faces = tmp_path / "faces"
    make_faces(faces)
    recipe = {
        "name": "tiny_mbf_w8a8", "device": "cpu", "model": {"name": "mobilefacenet"},
        "quant": {"weight_bits": 8, "act_bits": 8},
        "calibration": {"images": 8, "batch_size": 4, "data": {"kind": "folder", "root": str(faces)}},
        "finetune": {"data": {"kind": "folder", "root": str(faces)}, "steps": 2, "identities_per_batch": 2,
                     "images_per_identity": 2, "checkpoint_every": 1},
        "eval": [{"name": "pairs", "pairs": str(faces / "pairs.txt"), "root": str(faces), "n_folds": 2}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    res = runner.invoke(app, ["apply", str(path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    for name in ("recipe.yaml", "compression.json", "model.pt", "metrics.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["results"]) == {"teacher", "student"}
    report = json.loads((out / "compression.json").read_text())
    assert report["summary"]["quantized_layers"] == 50
    assert len([h for h in report["history"] if "loss" in h or "total" in h]) >= 1


def test_apply_unwritable_out_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = tmp_path / "r.yaml"
    path.write_text("quant: {}\n")
    res = runner.invoke(app, ["apply", str(path), "--model", "mobilefacenet", "--out", str(blocker / "run")])
    assert res.exit_code == 2 and "not writable" in res.output
