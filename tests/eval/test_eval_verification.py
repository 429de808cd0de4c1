"""Pair verification end to end: ``.bin`` packs and image folders with pairs lists, plus the caches."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import efquant_fx.eval.images as images_mod
from efquant_fx.errors import EfquantError
from efquant_fx.eval import get_evaluator, model_hash
from efquant_fx.eval.pairs import read_pairs
from efquant_fx.eval.verification import BinVerification, PairsVerification
from tests.eval.eval_helpers import (
    CUBE_COLORS,
    CountingModel,
    MeanColor,
    TinyNet,
    face_like,
    save_png,
    solid_png,
)

# 30 pairs, 3 folds of 10. Genuine pairs share a colour, impostors differ; three pairs are wrong on purpose.
N_PAIRS = 30
WRONG = {0: "genuine pair, different colours", 11: "impostor pair, same colour", 12: "genuine, different"}


def _pair_colors(i: int) -> tuple[tuple, tuple, bool]:
    same = i % 2 == 0
    a = CUBE_COLORS[i % 8]
    b = a if same else CUBE_COLORS[(i + 3) % 8]
    if i in WRONG:
        b = CUBE_COLORS[(i + 5) % 8] if same else a
    return a, b, same


def _write_bin(path, protocol=pickle.HIGHEST_PROTOCOL):
    bins, issame = [], []
    for i in range(N_PAIRS):
        a, b, same = _pair_colors(i)
        bins += [solid_png(a), solid_png(b)]
        issame.append(same)
    path.write_bytes(pickle.dumps((bins, issame), protocol=protocol))
    return path


def test_bin_accuracy_is_exactly_known(tmp_path):
    ev = get_evaluator("lfw_bin", path=_write_bin(tmp_path / "lfw.bin"), n_folds=3)
    res = ev.evaluate(MeanColor(), batch_size=7)
    # fold 0 (pairs 0-9) has one error, fold 1 (10-19) two, fold 2 none
    expected = np.array([0.9, 0.8, 1.0])
    np.testing.assert_allclose(res.info["fold_accuracies"], expected)
    assert res.metrics["acc"] == pytest.approx(expected.mean())
    assert res.metrics["acc_std"] == pytest.approx(expected.std())
    assert res.metrics["xnorm"] == pytest.approx(np.sqrt(3))  # every raw embedding is (+-1, +-1, +-1)
    assert res.name == "lfw" and res.protocol == "lfw_bin" and res.curve is not None
    assert res.info["n_pairs"] == 30 and res.info["n_folds"] == 3


def test_feature_cache_skips_decoding_and_forward(tmp_path, monkeypatch):
    pack = _write_bin(tmp_path / "agedb_30.bin")
    cache = tmp_path / "cache"
    model = CountingModel(TinyNet(1))
    first = BinVerification(pack, n_folds=3).evaluate(model, cache=cache)
    assert model.calls > 0
    calls = model.calls
    decoded = []
    real_decode = images_mod.decode_image
    monkeypatch.setattr(images_mod, "decode_image", lambda *a, **k: decoded.append(1) or real_decode(*a, **k))
    again = BinVerification(pack, n_folds=3).evaluate(model, cache=cache)  # a fresh object: disk cache only
    assert model.calls == calls and not decoded
    assert again.metrics == first.metrics
    # a "student" with other weights: new features, but the decoded images come from the cache
    student = CountingModel(TinyNet(2))
    BinVerification(pack, n_folds=3).evaluate(student, cache=cache)
    assert student.calls > 0 and not decoded
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["features", "features", "images"]


def test_duplicate_images_are_embedded_once(tmp_path):
    model = CountingModel(MeanColor())
    res = BinVerification(_write_bin(tmp_path / "lfw.bin"), n_folds=3).evaluate(model, batch_size=1)
    assert model.calls == 2 * len(CUBE_COLORS)  # 60 images but 8 distinct colours, original + flip
    assert res.metrics["acc"] == pytest.approx(0.9)


def test_model_hash_tracks_weights_and_class():
    a, b = TinyNet(0), TinyNet(0)
    assert model_hash(a) == model_hash(b)
    with torch.no_grad():
        b.conv1.weight[0, 0, 0, 0] += 1e-6
    assert model_hash(a) != model_hash(b)
    assert model_hash(MeanColor()) != model_hash(CountingModel(MeanColor()))


def test_model_with_wrong_output_is_explained(tmp_path):
    class Bad(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(EfquantError, match=r"expected embeddings of shape \[.*, D\]"):
        BinVerification(_write_bin(tmp_path / "lfw.bin"), n_folds=3).evaluate(Bad())


def _lfw_tree(tmp_path):
    root = tmp_path / "images"
    for ident, seed in (("Ann_A", 1), ("Bob_B", 2), ("Cid_C", 3)):
        for n in (1, 2):
            save_png(
                root / ident / f"{ident}_{n:04d}.jpg", face_like(seed, noise=3, noise_seed=seed * 10 + n)
            )
    return root


def test_lfw_pairs_txt_format(tmp_path):
    root = _lfw_tree(tmp_path)
    txt = tmp_path / "pairs.txt"
    txt.write_text(
        "2\t2\nAnn_A\t1\t2\nBob_B\t1\t2\nAnn_A\t1\tBob_B\t2\nBob_B\t1\tCid_C\t1\n"
        "Cid_C\t1\t2\nAnn_A\t2\t1\nAnn_A\t2\tCid_C\t2\nCid_C\t2\tBob_B\t1\n"
    )
    pl = read_pairs(txt, root)
    assert pl.n_sets == 2 and len(pl) == 8 and pl.issame == [True, True, False, False] * 2
    assert (
        pl.left[2] == root / "Ann_A" / "Ann_A_0001.jpg" and pl.right[2] == root / "Bob_B" / "Bob_B_0002.jpg"
    )
    ev = PairsVerification(txt, root)
    res = ev.evaluate(TinyNet(0))
    assert ev.n_folds == 2 and res.info["n_pairs"] == 8
    assert len(ev.load()[0]) == 6  # each distinct image is embedded once
    assert 0.0 <= res.metrics["acc"] <= 1.0


def test_plain_pairs_list_matches_bin(tmp_path):
    root = tmp_path / "data"
    lines = []
    for i in range(N_PAIRS):
        a, b, same = _pair_colors(i)
        save_png(root / "x" / f"{i}a.png", np.full((112, 112, 3), a, np.uint8))
        save_png(root / "x" / f"{i}b.png", np.full((112, 112, 3), b, np.uint8))
        lines.append(f"x/{i}a.png x/{i}b.png {int(same)}")
    (root / "pairs.txt").write_text("# path1 path2 label\n" + "\n".join(lines) + "\n")
    res = PairsVerification(root / "pairs.txt", n_folds=3).evaluate(MeanColor())
    ref = BinVerification(_write_bin(tmp_path / "lfw.bin"), n_folds=3).evaluate(MeanColor())
    assert res.metrics == ref.metrics


@pytest.mark.parametrize(
    "line", ["../outside.png x/a.png 1", "x/a.png /etc/passwd 0", "x/../../outside.png x/a.png 1"]
)
def test_pairs_escaping_the_root_are_refused(tmp_path, line):
    root = tmp_path / "data"
    save_png(root / "x" / "a.png", face_like(0))
    save_png(tmp_path / "outside.png", face_like(1))
    (root / "pairs.txt").write_text(line + "\n")
    with pytest.raises(EfquantError, match=r"pairs.txt: line 1: image path .*(escapes|absolute)"):
        read_pairs(root / "pairs.txt", root)


def test_lfw_names_escaping_the_root_are_refused(tmp_path):
    root = _lfw_tree(tmp_path)
    txt = tmp_path / "pairs.txt"
    txt.write_text("1\t1\nAnn_A\t1\t2\n..\t1\tAnn_A\t1\n")
    with pytest.raises(EfquantError, match="line 3: image path .* escapes"):
        read_pairs(txt, root)


def test_bad_pairs_lines_and_images_name_the_file(tmp_path):
    root = _lfw_tree(tmp_path)
    txt = tmp_path / "p.txt"
    txt.write_text("Ann_A/Ann_A_0001.jpg Bob_B/Bob_B_0001.jpg maybe\n")
    with pytest.raises(EfquantError, match="p.txt: line 1: label 'maybe'"):
        read_pairs(txt, root)
    (root / "Ann_A" / "Ann_A_0002.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    txt.write_text(
        "Ann_A/Ann_A_0001.jpg Ann_A/Ann_A_0002.jpg 1\nAnn_A/Ann_A_0001.jpg Bob_B/Bob_B_0001.jpg 0\n"
    )
    with pytest.raises(EfquantError, match=r"Ann_A_0002.jpg: cannot decode image"):
        PairsVerification(txt, root, n_folds=2).evaluate(TinyNet(0))


def test_model_hash_tells_apart_quantizers_that_differ_only_in_bit_width():
    """Brevitas keeps bit widths outside the state dict: a W4 and a W8 copy must not share cached features."""
    from brevitas.nn import QuantConv2d

    torch.manual_seed(0)
    w8 = QuantConv2d(3, 4, 3, weight_bit_width=8)
    w4 = QuantConv2d(3, 4, 3, weight_bit_width=4)
    w4.load_state_dict(w8.state_dict())
    assert set(w8.state_dict()) == set(w4.state_dict())
    assert model_hash(w8) != model_hash(w4)
    w8_again = QuantConv2d(3, 4, 3, weight_bit_width=8)
    w8_again.load_state_dict(w8.state_dict())
    assert model_hash(w8_again) == model_hash(w8)
