"""Dense all-vs-all protocol on an identity folder tree, checked against a brute-force computation."""

from __future__ import annotations

import numpy as np
import pytest

from efquant_fx.errors import EfquantError
from efquant_fx.eval import extract_embeddings, far_key
from efquant_fx.eval.dense import DenseVerification
from efquant_fx.eval.embed import l2_normalize
from efquant_fx.eval.images import ImageSet
from tests.eval.eval_helpers import TinyNet, face_like, save_png

IDS = {"Ann_A": 3, "Bob_B": 1, "Cid_C": 4, "Dee_D": 2, "Eve_E": 3}


def _tree(tmp_path):
    root = tmp_path / "images"
    for k, (ident, n) in enumerate(IDS.items()):
        for i in range(1, n + 1):
            save_png(root / ident / f"{ident}_{i:04d}.jpg", face_like(k, noise=25, noise_seed=10 * k + i))
    return root


def _brute(emb, labels, far):
    s = emb @ emb.T
    iu = np.triu_indices(len(labels), k=1)
    same = labels[iu[0]] == labels[iu[1]]
    gen, imp = s[iu][same], s[iu][~same]
    best = 0.0
    for t in np.r_[np.unique(s[iu]), np.inf]:
        if np.mean(imp >= t) <= far:
            best = max(best, float(np.mean(gen >= t)))
    return best, gen.size, imp.size


def test_dense_matches_brute_force(tmp_path):
    root = _tree(tmp_path)
    fars = [1e-2, 0.05, 0.1, 0.3]
    ev = DenseVerification(root, fars=fars, block_elements=20)  # several row blocks
    res = ev.evaluate(TinyNet(0))
    images, labels, names = ev.load()
    assert names == sorted(IDS) and len(images) == sum(IDS.values())
    feats = extract_embeddings(TinyNet(0), ImageSet.from_files(images.items))
    emb = l2_normalize(feats.sum(axis=1)).astype(np.float32)
    n_gen = sum(n * (n - 1) // 2 for n in IDS.values())
    assert res.info["n_genuine"] == n_gen and res.info["n_impostor"] == 13 * 12 // 2 - n_gen
    for far in fars:
        expected, _, _ = _brute(emb.astype(np.float64), labels, far)
        assert res.metrics[far_key(far)] == pytest.approx(expected, abs=1e-9), far
    assert res.curve is not None and res.curve.fpr.max() <= 0.3 + 1e-9


def test_dense_selects_identities_from_pairs_or_list(tmp_path):
    root = _tree(tmp_path)
    pairs = tmp_path / "dev_pairs.txt"
    pairs.write_text("1\t1\nAnn_A\t1\t2\nCid_C\t1\tEve_E\t2\n")
    _, labels, names = DenseVerification(root, pairs=pairs).load()
    assert names == ["Ann_A", "Cid_C", "Eve_E"] and len(labels) == 10
    lst = tmp_path / "list.txt"
    lst.write_text("Ann_A/Ann_A_0001.jpg 0\nAnn_A/Ann_A_0002.jpg 0\nBob_B/Bob_B_0001.jpg 1\n")
    images, labels, _ = DenseVerification(root, image_list=lst).load()
    assert len(images) == 3 and labels.tolist() == [0, 0, 1]
    lst.write_text("../escape.jpg 0\n")
    with pytest.raises(EfquantError, match="list.txt: line 1: image path .* escapes"):
        DenseVerification(root, image_list=lst).load()


def test_dense_needs_genuine_pairs(tmp_path):
    root = tmp_path / "images"
    save_png(root / "A" / "A_0001.jpg", face_like(0))
    save_png(root / "B" / "B_0001.jpg", face_like(1))
    with pytest.raises(EfquantError, match="no genuine pairs"):
        DenseVerification(root).load()
    with pytest.raises(EfquantError, match="fars"):
        DenseVerification(root, fars=[0.0])
