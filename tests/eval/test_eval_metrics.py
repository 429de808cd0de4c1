"""Metric functions against known answers, brute force, sklearn, and literal ports of insightface code."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_curve
from sklearn.model_selection import KFold

from efquant_fx.errors import EfquantError
from efquant_fx.eval.dense import dense_scores, dense_tar_at_far
from efquant_fx.eval.metrics import (
    INSIGHTFACE_THRESHOLDS,
    kfold_accuracy,
    pair_distances,
    roc_from_top,
    tar_at_far,
    tar_at_far_nearest,
)
from efquant_fx.eval.result import far_key


def _insightface_accuracy(dist, issame, n_folds):
    """Literal port of insightface ``calculate_roc``'s accuracy part (loops over thresholds)."""
    thresholds = np.arange(0, 4, 0.01)
    accuracy = np.zeros(n_folds)
    for fold, (train, test) in enumerate(KFold(n_splits=n_folds, shuffle=False).split(np.arange(len(dist)))):
        acc_train = np.zeros(len(thresholds))
        for i, t in enumerate(thresholds):
            pred = np.less(dist[train], t)
            act = issame[train]
            tp = np.sum(np.logical_and(pred, act))
            tn = np.sum(np.logical_and(~pred, ~act))
            acc_train[i] = float(tp + tn) / dist[train].size
        best = np.argmax(acc_train)
        pred = np.less(dist[test], thresholds[best])
        act = issame[test]
        accuracy[fold] = float(np.sum(pred & act) + np.sum(~pred & ~act)) / dist[test].size
    return accuracy


def test_kfold_accuracy_known_answer():
    # 60 pairs, 10 folds of 6: genuine at distance 0.5, impostors at 2.0, three deliberate errors
    issame = np.array([i % 2 == 0 for i in range(60)])
    dist = np.where(issame, 0.5, 2.0)
    dist[0] = 3.0  # genuine pair far apart (fold 0)
    dist[13] = 0.2  # impostor pair close (fold 2)
    dist[14] = 3.5  # genuine pair far apart (fold 2)
    res = kfold_accuracy(dist, issame, n_folds=10)
    expected = np.ones(10)
    expected[0] = 5 / 6
    expected[2] = 4 / 6
    np.testing.assert_allclose(res.accuracies, expected)
    assert res.mean == pytest.approx(0.95)
    assert res.std == pytest.approx(float(np.std(expected)))
    # the lowest threshold separating 0.5 from 2.0 on the training folds: argmax picks 0.51
    np.testing.assert_allclose(res.thresholds, 0.51)


def test_kfold_accuracy_three_folds_and_bad_folds():
    issame = np.array([True, False] * 15)
    dist = np.where(issame, 1.0, 3.0)
    dist[1] = 0.0  # one wrong impostor in fold 0 (pairs 0-9)
    res = kfold_accuracy(dist, issame, n_folds=3)
    np.testing.assert_allclose(res.accuracies, [0.9, 1.0, 1.0])
    with pytest.raises(EfquantError, match="n_folds"):
        kfold_accuracy(dist, issame, n_folds=31)


def test_kfold_accuracy_matches_insightface_loop():
    rng = np.random.default_rng(0)
    issame = rng.random(200) < 0.5
    dist = np.clip(np.where(issame, rng.normal(1.0, 0.4, 200), rng.normal(1.8, 0.4, 200)), 0, 4)
    dist = np.round(dist, 3)  # create ties with the threshold grid
    ours = kfold_accuracy(dist, issame, n_folds=10).accuracies
    np.testing.assert_array_equal(ours, _insightface_accuracy(dist, issame, 10))
    assert len(INSIGHTFACE_THRESHOLDS) == 400


def test_pair_distances_are_squared_euclidean_on_unit_vectors():
    a = np.array([[3.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 2.0], [2.0, 2.0]])
    np.testing.assert_allclose(pair_distances(a, b), [2.0, 0.0], atol=1e-12)


def _brute_tar_at_far(gen, imp, far):
    """Definition: best TAR of any threshold (accept score >= t) whose FAR is <= far."""
    best = 0.0
    for t in np.concatenate([np.unique(np.concatenate([gen, imp])), [np.inf]]):
        if np.mean(imp >= t) <= far:
            best = max(best, float(np.mean(gen >= t)))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tar_at_far_matches_brute_force_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    gen = np.round(rng.normal(0.6, 0.2, 80), 2)  # rounding creates ties on purpose
    imp = np.round(rng.normal(0.1, 0.2, 500), 2)
    fars = [1e-3, 1 / 500, 0.01, 0.05, 0.1, 0.3, 1.0]
    ours = tar_at_far(gen, imp, fars)
    labels = np.r_[np.ones(gen.size), np.zeros(imp.size)]
    fpr, tpr, _ = roc_curve(labels, np.r_[gen, imp], drop_intermediate=False)
    for far in fars:
        assert ours[far] == pytest.approx(_brute_tar_at_far(gen, imp, far)), far
        assert ours[far] == pytest.approx(float(tpr[fpr <= far + 1e-15].max())), far


def _quantised_features(n, d, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(-3, 4, size=(n, d)).astype(np.float64) / 4  # exact dot products in any order


def test_dense_scores_match_full_matrix_and_are_block_independent():
    x = _quantised_features(40, 6, 0)
    labels = np.random.default_rng(1).integers(0, 6, size=40)
    full = x @ x.T
    iu = np.triu_indices(40, k=1)
    same = labels[iu[0]] == labels[iu[1]]
    gen_ref, imp_ref = np.sort(full[iu][same]), np.sort(full[iu][~same])[::-1]
    for block in (7, 50, 10_000):
        s = dense_scores(x, labels, keep_impostors=25, block_elements=block)
        np.testing.assert_array_equal(np.sort(s.genuine), gen_ref)
        np.testing.assert_array_equal(s.top_impostor, imp_ref[:25])
        assert s.n_impostor == imp_ref.size
    fars = [1e-3, 0.01, 0.02, 0.05]
    tars, _ = dense_tar_at_far(x, labels, fars, block_elements=13)
    for far in fars:
        assert tars[far] == pytest.approx(_brute_tar_at_far(gen_ref, imp_ref, far)), far


def test_roc_from_top_agrees_with_sklearn_points():
    rng = np.random.default_rng(3)
    gen, imp = rng.normal(1, 1, 300), rng.normal(-1, 1, 2000)
    top = np.sort(imp)[::-1][:200]
    fpr, tpr = roc_from_top(gen, top, imp.size)
    ref_fpr, ref_tpr, _ = roc_curve(
        np.r_[np.ones(300), np.zeros(2000)], np.r_[gen, imp], drop_intermediate=False
    )
    for f, t in zip(fpr, tpr, strict=True):
        assert t == pytest.approx(ref_tpr[np.isclose(ref_fpr, f)].max())


def _insightface_nearest(labels, scores, fars):
    """Literal port of ``eval_ijbc.py``'s TPR@FPR table code."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    out = {}
    for x in fars:
        _, min_index = min(list(zip(abs(fpr - x), range(len(fpr)), strict=True)))
        out[x] = tpr[min_index]
    return out


def test_tar_at_far_nearest_matches_insightface():
    rng = np.random.default_rng(4)
    labels = np.r_[np.ones(50), np.zeros(3000)]
    scores = np.round(np.r_[rng.normal(0.5, 0.2, 50), rng.normal(0, 0.2, 3000)], 2)
    fars = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    ours = tar_at_far_nearest(labels, scores, fars)
    ref = _insightface_nearest(labels, scores, fars)
    for far in fars:
        assert ours[far] == pytest.approx(ref[far])


def test_far_key_names():
    assert far_key(1e-4) == "tar@far=1e-4"
    assert far_key(1e-2) == "tar@far=1e-2"
    assert far_key(3e-4) == "tar@far=0.0003"
