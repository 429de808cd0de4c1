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
        "name": "tiny_mbf_w8a8", "device": "cpu", "model": {"name": "mobilefacenet", "random_weights": True},
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
    # stderr is not a terminal here: progress comes as log lines (issue 16, item 3), stdout keeps the results
    for line in ("graph pass 3/3: calibrate", "compress: teacher-student cosine", "fine-tune: 2 steps",
                 "fine-tune: step 2/2 (100%)", "eval: pairs", "on the student done in"):
        assert line in res.stderr, line
    assert "fine-tune: step" not in res.stdout and "graph pass" not in res.stdout


def test_apply_unwritable_out_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = tmp_path / "r.yaml"
    path.write_text("quant: {}\n")
    res = runner.invoke(app, ["apply", str(path), "--model", "mobilefacenet", "--out", str(blocker / "run")])
    assert res.exit_code == 2 and "not writable" in res.output


def _ptq_recipe(tmp_path, name: str, bits: int):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "device": "cpu",
                                    "model": {"name": "mobilefacenet", "random_weights": True},
                                    "quant": {"weight_bits": bits, "act_bits": 8},
                                    "calibration": {"images": 4, "batch_size": 4}}))
    return path


def one_line(res) -> str:
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_apply_into_another_run_is_refused_unless_overwrite(tmp_path):
    """Issue 16, item 4: a second run into the same --out mixed two runs' files."""
    out = tmp_path / "run"
    w8, w4 = _ptq_recipe(tmp_path, "w8", 8), _ptq_recipe(tmp_path, "w4", 4)
    assert runner.invoke(app, ["apply", str(w8), "--out", str(out)]).exit_code == 0
    (out / "best.pt").write_bytes(b"w8 fine-tune")  # files of the first run that the second would not rewrite
    (out / "eval").mkdir()
    (out / "eval" / "metrics.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    before = (out / "model.pt").read_bytes()

    line = one_line(runner.invoke(app, ["apply", str(w4), "--out", str(out)]))
    assert line.startswith(f"error: {out}: --out: not empty (holds best.pt, compression.json, eval, model.pt")
    assert "--overwrite" in line and (out / "model.pt").read_bytes() == before  # refused before any work

    line = one_line(runner.invoke(app, ["apply", str(w4), "--out", str(out), "--resume"]))
    assert "--resume: the run here was started by another recipe (w8" in line

    res = runner.invoke(app, ["apply", str(w4), "--out", str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (out / "best.pt").exists() and not (out / "eval").exists()
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are cleared
    assert yaml.safe_load((out / "recipe.yaml").read_text())["name"] == "w4"

    res = runner.invoke(app, ["apply", str(w4), "--out", str(out), "--resume"])  # the same recipe continues
    assert res.exit_code == 0, res.output
    assert "pass one of them" in one_line(runner.invoke(app, ["apply", str(w4), "--out", str(out), "--resume",
                                                               "--overwrite"]))


def test_eval_or_export_of_a_run_that_did_not_finish(tmp_path):
    """A failed apply leaves recipe.yaml (what was asked) and no model.pt: say so, not CompressionResult.save()."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(_ptq_recipe(tmp_path, "w8", 8).read_text())
    make_faces(tmp_path / "faces", identities=2, per_identity=2)
    pairs = f"pairs:pairs={tmp_path / 'faces' / 'pairs.txt'},root={tmp_path / 'faces'}"
    for args in (["export", str(run)], ["eval", str(run), "--eval", pairs]):
        line = one_line(runner.invoke(app, args))
        assert line == f"error: {run}: this run did not finish: no model.pt; rerun efquant-fx apply", line
    (run / "last.pt").write_bytes(b"")
    line = one_line(runner.invoke(app, ["export", str(run)]))
    assert line.endswith("rerun efquant-fx apply (with --resume to continue its fine-tune from last.pt)")
    assert sorted(p.name for p in run.iterdir()) == ["last.pt", "recipe.yaml"]  # no empty export/ or eval/


def test_apply_says_when_no_images_were_held_out(tmp_path):
    res = runner.invoke(app, ["apply", str(_ptq_recipe(tmp_path, "w8", 8)), "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "cosine on the calibration images (none held out): mean" in res.output
    assert "note: no images were held out: calibration has only 4 image(s)" in res.output
    assert "held-out images" not in res.output
