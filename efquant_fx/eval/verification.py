"""Pair verification exactly as insightface reports LFW / CFP-FP / AgeDB-30 ("Accuracy-Flip").

Protocol (``eval/verification.py``): embed each image and its horizontal flip, sum the two raw
embeddings, L2-normalise, take the squared Euclidean distance of each pair, then k-fold accuracy
with thresholds ``arange(0, 4, 0.01)`` over contiguous ``KFold(n_folds, shuffle=False)`` folds.
Reported as ``acc`` (mean over folds) and ``acc_std`` (``np.std``), plus ``xnorm`` and ``auc``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from efquant_fx.errors import EfquantError
from efquant_fx.eval.base import EmbeddingEvaluator
from efquant_fx.eval.embed import xnorm
from efquant_fx.eval.images import ImageSet
from efquant_fx.eval.metrics import kfold_accuracy, pair_distances
from efquant_fx.eval.pairs import PairList, read_pairs
from efquant_fx.eval.result import Curve, EvalResult
from efquant_fx.eval.safe_pickle import parse_verification_bin


def verification_result(
    name: str,
    protocol: str,
    features: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    issame: np.ndarray,
    *,
    n_folds: int,
    flip: bool,
) -> EvalResult:
    """Score pairs ``(left[i], right[i])`` of ``features`` ``[N, V, D]`` with the insightface protocol."""
    emb = features.sum(axis=1) if flip else features[:, 0]
    dist = pair_distances(emb[left], emb[right])
    same = np.asarray(issame, dtype=bool)
    folds = kfold_accuracy(dist, same, n_folds=n_folds)
    metrics = {"acc": folds.mean, "acc_std": folds.std, "xnorm": xnorm(features)}
    curve = None
    if same.any() and not same.all():
        metrics["auc"] = float(roc_auc_score(same, -dist))
        fpr, tpr, _ = roc_curve(same, -dist)
        curve = Curve(fpr, tpr)
    info = {
        "n_pairs": int(same.size),
        "n_same": int(same.sum()),
        "n_folds": n_folds,
        "flip": flip,
        "fold_accuracies": folds.accuracies.tolist(),
        "fold_thresholds": folds.thresholds.tolist(),
    }
    return EvalResult(name=name, protocol=protocol, metrics=metrics, curve=curve, info=info)


class BinVerification(EmbeddingEvaluator):
    """insightface ``.bin`` pack (lfw.bin, cfp_fp.bin, agedb_30.bin...), read with a restricted unpickler.

    ``n_folds`` defaults to 10 as in insightface; our LFW dev pack holds 3 LFW folds, use ``n_folds=3``.
    The pack must keep ``pairs.txt`` order for folds to coincide with the official sets.
    """

    name = "lfw_bin"

    def __init__(self, path: str | Path, *, n_folds: int = 10, flip: bool = True, label: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise EfquantError("verification pack not found", source=str(self.path), field="path")
        if n_folds < 2:
            raise EfquantError(f"n_folds must be >= 2, got {n_folds}", field="n_folds")
        self.n_folds = n_folds
        self.flip = flip
        self.label = label or self.path.stem
        self._data: tuple[ImageSet, np.ndarray] | None = None

    def load(self) -> tuple[ImageSet, np.ndarray]:
        """The pack's images (pair i = 2i, 2i+1) and labels, read once."""
        if self._data is None:
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                raise EfquantError(
                    f"cannot read verification pack: {exc.strerror or exc}", source=str(self.path)
                ) from None
            bins, issame = parse_verification_bin(data, source=str(self.path))
            names = [f"{self.path}[image {i}]" for i in range(len(bins))]
            digest = hashlib.sha256(b"bin:" + data).hexdigest()
            self._data = (ImageSet(bins, names, fingerprint=digest), np.asarray(issame, dtype=bool))
        return self._data

    def score(self, feats: np.ndarray, data: tuple[ImageSet, np.ndarray]) -> EvalResult:
        issame = data[1]
        idx = np.arange(len(issame))
        return verification_result(
            self.label, self.name, feats, 2 * idx, 2 * idx + 1, issame, n_folds=self.n_folds, flip=self.flip
        )


class PairsVerification(EmbeddingEvaluator):
    """Pair verification on an image folder with a pairs list (LFW ``pairs.txt`` or ``path1 path2 label``).

    ``root`` is the folder the list's paths are relative to (default: the list's folder); for LFW
    lists, images are ``<root>/<name>/<name>_<n:04d>.jpg`` (our data: ``root = .../lfw112/images``).
    ``n_folds`` defaults to the number of sets in an LFW header, else 10. Each distinct image is
    embedded once even if it appears in several pairs.
    """

    name = "pairs"

    def __init__(
        self,
        pairs: str | Path,
        root: str | Path | None = None,
        *,
        n_folds: int | None = None,
        flip: bool = True,
        label: str | None = None,
    ):
        self.pairs_path = Path(pairs)
        if not self.pairs_path.is_file():
            raise EfquantError("pairs file not found", source=str(self.pairs_path), field="pairs")
        self.root = Path(root) if root is not None else self.pairs_path.parent
        if not self.root.is_dir():
            raise EfquantError("data root is not a folder", source=str(self.root), field="root")
        self._n_folds = n_folds
        self.flip = flip
        self.label = label or self.pairs_path.stem
        self._data: tuple[ImageSet, np.ndarray, np.ndarray, PairList] | None = None

    def load(self) -> tuple[ImageSet, np.ndarray, np.ndarray, PairList]:
        """Distinct images, left/right indices into them, and the parsed list, read once."""
        if self._data is None:
            pl = read_pairs(self.pairs_path, self.root)
            index: dict[Path, int] = {}
            for p in [*pl.left, *pl.right]:
                index.setdefault(p, len(index))
            images = ImageSet.from_files(list(index))
            left = np.array([index[p] for p in pl.left], dtype=np.int64)
            right = np.array([index[p] for p in pl.right], dtype=np.int64)
            self._data = (images, left, right, pl)
        return self._data

    @property
    def n_folds(self) -> int:
        if self._n_folds is not None:
            return self._n_folds
        return self.load()[3].n_sets or 10

    def score(self, feats: np.ndarray, data: tuple[ImageSet, np.ndarray, np.ndarray, PairList]) -> EvalResult:
        _, left, right, pl = data
        return verification_result(
            self.label, self.name, feats, left, right, np.asarray(pl.issame), n_folds=self.n_folds, flip=self.flip
        )
