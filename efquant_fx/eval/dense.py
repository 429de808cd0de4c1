"""Dense all-vs-all verification on an image folder: every image pair is scored.

Genuine = every pair of images of the same identity, impostor = every pair of different identities
(each unordered pair once, no self-pairs). Scores are cosine similarities of flip-summed, L2-normalised
embeddings, computed in row blocks with a matrix product. Millions of impostor scores are never
kept: only the highest ``floor(max FAR * n_impostor) + 1`` are, which is all that exact TAR@FAR
(``FAR <= target``, see :func:`efquant_fx.eval.metrics.tar_at_far`) needs, so memory stays bounded
by the block size plus that top list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from efquant_fx.errors import EfquantError
from efquant_fx.eval.base import EmbeddingEvaluator
from efquant_fx.eval.embed import l2_normalize, xnorm
from efquant_fx.eval.images import ImageSet, list_image_files, resolve_under_root
from efquant_fx.eval.metrics import allowed_false_accepts, roc_from_top, tar_at_far_from_top
from efquant_fx.eval.pairs import lfw_identities
from efquant_fx.eval.result import Curve, EvalResult, far_key

DENSE_FARS = (1e-5, 1e-4, 1e-3, 1e-2)


@dataclass(frozen=True)
class DenseScores:
    """All genuine scores, the highest impostor scores (descending) and the impostor count."""

    genuine: np.ndarray
    top_impostor: np.ndarray
    n_impostor: int


def dense_scores(
    features: np.ndarray, labels: np.ndarray, *, keep_impostors: int, block_elements: int = 8_000_000
) -> DenseScores:
    """Score every unordered pair of rows of ``features`` (already normalised) by dot product.

    Works through row blocks of about ``block_elements`` scores; keeps all genuine scores and the
    ``keep_impostors`` highest impostor scores.
    """
    x = np.ascontiguousarray(features)
    lab = np.asarray(labels).reshape(-1)
    n = x.shape[0]
    if lab.shape[0] != n:
        raise ValueError("features and labels differ in length")
    genuine: list[np.ndarray] = []
    top = np.empty(0, dtype=x.dtype)
    n_imp = 0
    rows = max(1, block_elements // max(n, 1))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        block = x[start:stop] @ x[start:].T  # [r, n - start]
        upper = np.arange(n - start)[None, :] > np.arange(stop - start)[:, None]
        same = lab[start:stop, None] == lab[None, start:]
        genuine.append(block[upper & same])
        imp = block[upper & ~same]
        n_imp += imp.size
        if imp.size:
            merged = np.concatenate([top, imp])
            if merged.size > keep_impostors:
                merged = np.partition(merged, merged.size - keep_impostors)[merged.size - keep_impostors :]
            top = merged
    return DenseScores(np.concatenate(genuine) if genuine else np.empty(0), np.sort(top)[::-1], n_imp)


def dense_tar_at_far(
    features: np.ndarray,
    labels: np.ndarray,
    fars: Sequence[float] = DENSE_FARS,
    *,
    block_elements: int = 8_000_000,
) -> tuple[dict[float, float], DenseScores]:
    """Exact TAR at each FAR over all pairs of ``features`` (rows normalised by the caller)."""
    lab = np.asarray(labels)
    counts = np.unique(lab, return_counts=True)[1].astype(np.int64)
    n = int(lab.size)
    n_imp = n * (n - 1) // 2 - int((counts * (counts - 1) // 2).sum())
    keep = min(n_imp, allowed_false_accepts(max(fars), n_imp) + 1)
    scores = dense_scores(features, lab, keep_impostors=max(keep, 1), block_elements=block_elements)
    tars, _ = tar_at_far_from_top(scores.genuine, scores.top_impostor, scores.n_impostor, fars)
    return tars, scores


def _identity_images(root: Path, identities: Sequence[str], *, source: str) -> list[tuple[Path, str]]:
    out: list[tuple[Path, str]] = []
    for ident in identities:
        folder = resolve_under_root(root, ident, source=source, field="identity")
        if not folder.is_dir():
            raise EfquantError(f"no image folder for identity {ident!r}", source=str(folder))
        out.extend((p, ident) for p in list_image_files(folder))
    return out


def _read_image_list(path: Path, root: Path) -> list[tuple[Path, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EfquantError(f"cannot read image list ({exc.strerror or exc})", source=str(path)) from None
    out: list[tuple[Path, str]] = []
    for no, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        rel = fields[0]
        p = resolve_under_root(root, rel, source=str(path), field=f"line {no}")
        ident = fields[1] if len(fields) > 1 else Path(rel).parent.name
        if not ident:
            raise EfquantError(
                "no identity label and no identity folder", source=str(path), field=f"line {no}"
            )
        out.append((p, ident))
    return out


class DenseVerification(EmbeddingEvaluator):
    """All-vs-all TAR@FAR on an identity-folder tree (``<root>/<identity>/<image>``).

    Image selection, in order of precedence: ``image_list`` (lines ``path [identity]`` relative to
    ``root``; identity defaults to the parent folder), ``pairs`` (an LFW ``pairs.txt``: every image
    of every identity it names, e.g. the dev identities), or every identity folder under ``root``.
    ``fars`` defaults to 1e-5..1e-2; FARs below ``1 / n_impostor`` are meaningless (TAR at zero false
    accepts) and are reported anyway with the counts in ``info``.
    """

    name = "dense"

    def __init__(
        self,
        root: str | Path,
        *,
        pairs: str | Path | None = None,
        image_list: str | Path | None = None,
        fars: Sequence[float] = DENSE_FARS,
        flip: bool = True,
        label: str | None = None,
        block_elements: int = 8_000_000,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise EfquantError("image root is not a folder", source=str(self.root), field="root")
        self.pairs = Path(pairs) if pairs is not None else None
        self.image_list = Path(image_list) if image_list is not None else None
        for fld, p in (("pairs", self.pairs), ("image_list", self.image_list)):
            if p is not None and not p.is_file():
                raise EfquantError("file not found", source=str(p), field=fld)
        fars = [float(f) for f in fars]
        if not fars or any(not 0.0 < f <= 1.0 for f in fars):
            raise EfquantError(f"fars must be in (0, 1], got {fars}", field="fars")
        self.fars = sorted(fars)
        self.flip = flip
        self.label = label or "dense"
        self.block_elements = block_elements
        self._data: tuple[ImageSet, np.ndarray, list[str]] | None = None

    def load(self) -> tuple[ImageSet, np.ndarray, list[str]]:
        """Images, integer identity labels, and identity names, listed once."""
        if self._data is None:
            if self.image_list is not None:
                entries = _read_image_list(self.image_list, self.root)
            else:
                if self.pairs is not None:
                    identities = lfw_identities(self.pairs)
                    src = str(self.pairs)
                else:
                    identities = sorted(p.name for p in self.root.iterdir() if p.is_dir())
                    src = str(self.root)
                entries = _identity_images(self.root, identities, source=src)
            if len(entries) < 2:
                raise EfquantError("fewer than two images found", source=str(self.root))
            names = sorted({ident for _, ident in entries})
            index = {ident: i for i, ident in enumerate(names)}
            labels = np.array([index[ident] for _, ident in entries], dtype=np.int64)
            counts = np.bincount(labels)
            if not (counts >= 2).any():
                raise EfquantError(
                    "no identity has two images, so there are no genuine pairs", source=str(self.root)
                )
            if len(names) < 2:
                raise EfquantError("only one identity, so there are no impostor pairs", source=str(self.root))
            self._data = (ImageSet.from_files([p for p, _ in entries]), labels, names)
        return self._data

    def score(self, feats: np.ndarray, data: tuple[ImageSet, np.ndarray, list[str]]) -> EvalResult:
        images, labels, names = data
        emb = l2_normalize(feats.sum(axis=1) if self.flip else feats[:, 0]).astype(np.float32)
        tars, scores = dense_tar_at_far(emb, labels, self.fars, block_elements=self.block_elements)
        metrics = {far_key(f): t for f, t in tars.items()}
        metrics["xnorm"] = xnorm(feats)
        fpr, tpr = roc_from_top(scores.genuine, scores.top_impostor, scores.n_impostor)
        info = {
            "n_images": len(images),
            "n_identities": len(names),
            "n_genuine": int(scores.genuine.size),
            "n_impostor": int(scores.n_impostor),
            "min_resolvable_far": 1.0 / scores.n_impostor,
            "genuine_mean": float(scores.genuine.mean()),
            "flip": self.flip,
        }
        return EvalResult(self.label, self.name, metrics, Curve(fpr, tpr), info)
