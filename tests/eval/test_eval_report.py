"""Metrics JSON (atomic, loadable, with versions), the comparison table, ROC plots, 1:N identification."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

import efquant_fx.eval.report as report_mod
from efquant_fx.eval import Curve, EvalResult, compare_table, plot_roc, write_metrics_json
from efquant_fx.eval.identification import Identification
from tests.eval.eval_helpers import MeanColor, face_like, save_png


def _results(acc: float, tar: float) -> list[EvalResult]:
    return [
        EvalResult(
            "lfw", "lfw_bin", {"acc": acc, "acc_std": 0.01, "xnorm": 21.5}, Curve([0, 0.1, 1], [0, 0.9, 1])
        ),
        EvalResult(
            "dense", "dense", {"tar@far=1e-4": tar, "xnorm": float("nan")}, Curve([1e-5, 1e-3], [0.5, 0.8])
        ),
    ]


def test_metrics_json_is_atomic_and_loads(tmp_path, monkeypatch):
    path = tmp_path / "out" / "metrics.json"
    write_metrics_json(
        path,
        {"teacher": _results(0.99, 0.8), "w4a8": _results(0.98, 0.7)},
        recipe_hash="abc123",
        model_hashes={"teacher": "t" * 64},
        extra={"command": ["efquant-fx", "eval"], "array": np.arange(3)},
    )
    doc = json.loads(path.read_text())
    assert doc["results"]["teacher"]["lfw"]["metrics"]["acc"] == 0.99
    assert doc["results"]["w4a8"]["dense"]["metrics"]["xnorm"] is None  # NaN -> null, strict JSON
    assert doc["recipe_hash"] == "abc123" and doc["model_hashes"]["teacher"] == "t" * 64
    assert doc["extra"]["array"] == [0, 1, 2]
    env = doc["environment"]
    assert {"torch", "efquant_fx", "python", "platform"} <= set(env) and env["torch"]

    # a failure while replacing leaves the previous file untouched and no temp file behind
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(report_mod.os, "replace", boom)
    with pytest.raises(OSError):
        write_metrics_json(path, _results(0.5, 0.5))
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["metrics.json"]


def _render(table) -> str:
    console = Console(width=200, record=True, color_system=None)
    console.print(table)
    return console.export_text()


def test_compare_table_teacher_and_several_students(tmp_path):
    teacher = _results(0.9950, 0.80)
    text = _render(compare_table(teacher, _results(0.9900, 0.75)))
    assert "99.50%" in text and "99.00%" in text and "-0.50 pp" in text and "-5.00 pp" in text
    text = _render(
        compare_table(teacher, _results(0.99, 0.7), _results(0.996, 0.81), names=["fp32", "w4a8", "w8a8"])
    )
    assert "w4a8" in text and "w8a8" in text and "+0.10 pp" in text and "+1.00 pp" in text
    # flat dicts and the JSON layout work too
    write_metrics_json(tmp_path / "m.json", {"teacher": teacher})
    loaded = json.loads((tmp_path / "m.json").read_text())["results"]["teacher"]
    assert "-0.50 pp" in _render(compare_table(loaded, {r.name: r for r in _results(0.99, 0.8)}))
    assert "+1.00 pp" in _render(compare_table({"acc": 0.5}, {"acc": 0.51}))


def test_roc_plot_png(tmp_path):
    t, s = _results(0.99, 0.8), _results(0.98, 0.7)
    out = plot_roc(tmp_path / "roc.png", {"teacher": t[1], "w4a8": s[1].curve}, title="dense", fars=[1e-4])
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert sorted(os.listdir(tmp_path)) == ["roc.png"]


def test_identification_rank1(tmp_path):
    colors = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255)}
    for ident, col in colors.items():
        save_png(tmp_path / "gallery" / ident / "g.png", np.full((112, 112, 3), col, np.uint8))
        save_png(tmp_path / "probe" / ident / "p.png", np.full((112, 112, 3), col, np.uint8))
    # a probe of "c" that looks like "a": wrong at rank 1, right by rank 3
    save_png(tmp_path / "probe" / "c" / "q.png", np.full((112, 112, 3), colors["a"], np.uint8))
    save_png(tmp_path / "probe" / "z" / "p.png", face_like(0))  # not in the gallery: skipped
    res = Identification(tmp_path, ranks=(1, 3)).evaluate(MeanColor())
    assert res.metrics == {"rank1": pytest.approx(3 / 4), "rank3": 1.0}
    assert res.info["n_probes_skipped"] == 1
