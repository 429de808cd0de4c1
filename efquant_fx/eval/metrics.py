"""Verification metrics: insightface's k-fold pair accuracy, exact TAR@FAR, and IJB's nearest-FPR rule."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_curve
from sklearn.model_selection import KFold

from efquant_fx.errors import EfquantError

#: insightface ``verification.evaluate``: 400 squared-distance thresholds.
INSIGHTFACE_THRESHOLDS = np.arange(0, 4, 0.01)


@dataclass(frozen=True)
class FoldAccuracy:
    """Per-fold held-out accuracy and the threshold each fold chose on the other folds."""

    accuracies: np.ndarray
    thresholds: np.ndarray

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        """Population std over folds (``np.std``), as insightface prints it."""
        return float(np.std(self.accuracies))


def pair_distances(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance between L2-normalised rows (``= 2 - 2 cos``)."""
    a = np.asarray(emb1, dtype=np.float64)
    b = np.asarray(emb2, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.sum(np.square(a - b), axis=1)


def kfold_accuracy(
    distances: np.ndarray,
    issame: Sequence[bool] | np.ndarray,
    *,
    n_folds: int = 10,
    thresholds: np.ndarray | None = None,
) -> FoldAccuracy:
    """insightface's pair accuracy: contiguous ``KFold(n_folds, shuffle=False)`` folds; on each fold use
    the threshold with the best accuracy on the other folds (lowest wins ties, ``argmax``), predicting
    "same" when ``distance < threshold``."""
    dist = np.asarray(distances, dtype=np.float64).reshape(-1)
    same = np.asarray(issame, dtype=bool).reshape(-1)
    if dist.shape != same.shape:
        raise ValueError(f"{dist.shape[0]} distances for {same.shape[0]} labels")
    if n_folds < 2 or n_folds > dist.shape[0]:
        raise EfquantError(
            f"n_folds must be between 2 and the number of pairs ({dist.shape[0]}), got {n_folds}",
            field="n_folds",
        )
    thr = INSIGHTFACE_THRESHOLDS if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    correct = (dist[None, :] < thr[:, None]) == same[None, :]  # [T, N]
    accs, best = [], []
    for train, test in KFold(n_splits=n_folds, shuffle=False).split(dist):
        idx = int(np.argmax(correct[:, train].mean(axis=1)))
        best.append(thr[idx])
        accs.append(correct[idx, test].mean())
    return FoldAccuracy(np.asarray(accs), np.asarray(best))


def allowed_false_accepts(far: float, n_impostor: int) -> int:
    """How many impostor pairs may pass at ``far``: ``floor(far * n)``, robust to float round-off."""
    return int(math.floor(far * n_impostor * (1 + 1e-12)))


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, fars: Sequence[float]) -> dict[float, float]:
    """Exact TAR at each FAR: the best TAR of any threshold whose FAR is at most the target.

    With ``k = floor(far * n_impostor)`` impostors allowed through, the threshold sits just above the
    ``(k+1)``-th highest impostor score ``s``; TAR is the share of genuine scores ``> s``.
    Equals ``max(tpr[fpr <= far])`` on ``sklearn.metrics.roc_curve``.
    """
    imp = np.asarray(impostor, dtype=np.float64).reshape(-1)
    need = max(allowed_false_accepts(max(fars), imp.size) + 1, 1) if len(fars) else 1
    top = top_scores(imp, need)
    return tar_at_far_from_top(genuine, top, imp.size, fars)[0]


def top_scores(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` highest scores, sorted descending (all of them if fewer)."""
    s = np.asarray(scores).reshape(-1)
    if k < s.size:
        s = np.partition(s, s.size - k)[s.size - k :]
    return np.sort(s)[::-1]


def tar_at_far_from_top(
    genuine: np.ndarray, top_impostor: np.ndarray, n_impostor: int, fars: Sequence[float]
) -> tuple[dict[float, float], dict[float, float]]:
    """TAR@FAR (see :func:`tar_at_far`) from only the highest impostor scores, sorted descending.

    Returns ``(tar, threshold)`` per FAR; the threshold is the impostor score to beat (``score > t``).
    Needs ``floor(max(fars) * n_impostor) + 1`` top scores (or all of them).
    """
    gen = np.sort(np.asarray(genuine, dtype=np.float64).reshape(-1))
    if gen.size == 0 or n_impostor == 0:
        raise EfquantError("TAR@FAR needs at least one genuine and one impostor score")
    tars: dict[float, float] = {}
    thresholds: dict[float, float] = {}
    for far in fars:
        k = allowed_false_accepts(far, n_impostor)
        if k >= n_impostor:
            tars[far], thresholds[far] = 1.0, -math.inf
            continue
        if k >= top_impostor.size:
            raise ValueError(f"need {k + 1} top impostor scores for FAR {far}, have {top_impostor.size}")
        t = float(top_impostor[k])
        tars[far] = float(gen.size - np.searchsorted(gen, t, side="right")) / gen.size
        thresholds[far] = t
    return tars, thresholds


def roc_from_top(
    genuine: np.ndarray, top_impostor: np.ndarray, n_impostor: int, max_points: int = 2000
) -> tuple[np.ndarray, np.ndarray]:
    """ROC corner points (fpr, tpr) from the top impostor scores, log-spaced, for plotting.

    Each point lets through the impostors strictly above one of the top scores, and its TPR is
    the best at that FPR (the upper corner of the ROC step), as :func:`tar_at_far` reports.
    """
    gen = np.sort(np.asarray(genuine, dtype=np.float64).reshape(-1))
    top = np.asarray(top_impostor, dtype=np.float64).reshape(-1)
    if top.size == 0 or gen.size == 0:
        return np.zeros(0), np.zeros(0)
    idx = np.unique(np.geomspace(1, top.size, num=min(max_points, top.size)).astype(np.int64) - 1)
    thr = top[idx]
    accepted = np.searchsorted(-top, -thr, side="left")  # impostors strictly above thr
    fpr = accepted / n_impostor
    tpr = (gen.size - np.searchsorted(gen, thr, side="right")) / gen.size
    return fpr, tpr


def tar_at_far_nearest(labels: np.ndarray, scores: np.ndarray, fars: Sequence[float]) -> dict[float, float]:
    """insightface's IJB rule: TPR at the ``roc_curve`` point whose FPR is *nearest* the target FAR.

    The arrays are flipped first, so among equally near points the one with the largest TPR wins.
    This is neither interpolated nor "FAR <= target": at FARs below ``1/n_impostor`` it can report
    the TPR of a point with a larger FPR. Use it to compare with published IJB tables.
    """
    fpr, tpr, _ = roc_curve(np.asarray(labels), np.asarray(scores))
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    return {far: float(tpr[int(np.argmin(np.abs(fpr - far)))]) for far in fars}
