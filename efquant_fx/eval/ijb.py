"""IJB-B / IJB-C 1:1 template verification, following insightface's ``eval_ijbc.py`` ("N1D1F1").

Layout (insightface ``IJB_release``): ``<root>/meta/<prefix>_face_tid_mid.txt`` (``image template media``),
``<prefix>_template_pair_label.txt`` (``template1 template2 label``) and ``<prefix>_name_5pts_score.txt``
(``image x1 y1 ... x5 y5 faceness``, same image order), images in ``<root>/loose_crop/``.

Images are assumed to be already aligned 112x112 faces (e.g. produced by insightface's own
alignment) unless ``align=True``, which aligns the loose crops with their five points onto the
ArcFace template (:mod:`efquant_fx.eval.align`).

Pipeline: embed image + flip and sum them (F1); keep the raw norm (``use_norm_score=True``, N1) or
L2-normalise each image; multiply by the detector's faceness score (``use_detector_score=True``,
D1); average images of the same media (video frames), sum the media of a template, L2-normalise
the template; score = dot product of the two templates. TAR at FAR 1e-6..1e-1 uses insightface's
"nearest FPR" rule on ``sklearn.metrics.roc_curve`` (see :func:`~efquant_fx.eval.metrics.tar_at_far_nearest`),
so numbers compare with published IJB tables.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from efquant_fx.errors import EfquantError
from efquant_fx.eval.base import EmbeddingEvaluator
from efquant_fx.eval.embed import l2_normalize, xnorm
from efquant_fx.eval.images import ImageSet, resolve_under_root
from efquant_fx.eval.metrics import tar_at_far_nearest
from efquant_fx.eval.result import Curve, EvalResult, far_key

IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class IJBMeta:
    """The three meta files of an IJB set, parsed."""

    image_names: list[str]
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray
    faceness: np.ndarray
    pair_t1: np.ndarray
    pair_t2: np.ndarray
    pair_label: np.ndarray


def _rows(path: Path, n_fields: int, layout: str) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of each non-blank line; a line without ``n_fields`` fields is refused."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EfquantError("IJB meta file not found", source=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EfquantError(f"cannot read IJB meta file ({exc})", source=str(path)) from None
    for i, line in enumerate(text.splitlines()):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != n_fields:
            raise EfquantError(f"expected {layout!r}", source=str(path), field=f"line {i + 1}")
        yield i + 1, fields


def _numbers(fields: list[str], kind: type, path: Path, no: int) -> list:
    try:
        return [kind(f) for f in fields]
    except ValueError:
        raise EfquantError(
            f"expected {kind.__name__} values, got {' '.join(fields)!r}", source=str(path), field=f"line {no}"
        ) from None


def read_ijb_meta(meta_dir: Path, prefix: str) -> IJBMeta:
    """Parse the three ``<prefix>_*.txt`` meta files; errors name the file and line."""
    tid_path = meta_dir / f"{prefix}_face_tid_mid.txt"
    pts_path = meta_dir / f"{prefix}_name_5pts_score.txt"
    pair_path = meta_dir / f"{prefix}_template_pair_label.txt"
    names: list[str] = []
    tids: list[int] = []
    mids: list[int] = []
    for no, f in _rows(tid_path, 3, "image template_id media_id"):
        names.append(f[0])
        t, m = _numbers(f[1:], int, tid_path, no)
        tids.append(t)
        mids.append(m)
    lms: list[list[float]] = []
    scores: list[float] = []
    for i, (no, f) in enumerate(_rows(pts_path, 12, "image x1 y1 ... x5 y5 score")):
        if i >= len(names) or f[0] != names[i]:
            other = names[i] if i < len(names) else "nothing"
            raise EfquantError(
                f"image {f[0]!r} does not match {other!r} in {tid_path.name} (same order required)",
                source=str(pts_path),
                field=f"line {no}",
            )
        vals = _numbers(f[1:], float, pts_path, no)
        lms.append(vals[:10])
        scores.append(vals[10])
    if len(lms) != len(names):
        raise EfquantError(
            f"{len(lms)} lines for {len(names)} images in {tid_path.name}", source=str(pts_path)
        )
    t1: list[int] = []
    t2: list[int] = []
    labels: list[int] = []
    for no, f in _rows(pair_path, 3, "template1 template2 label"):
        a, b, lab = _numbers(f, int, pair_path, no)
        if lab not in (0, 1):
            raise EfquantError(f"label must be 0 or 1, got {lab}", source=str(pair_path), field=f"line {no}")
        t1.append(a)
        t2.append(b)
        labels.append(lab)
    if not names or not labels:
        raise EfquantError("no images or no template pairs", source=str(meta_dir))
    return IJBMeta(
        image_names=names,
        templates=np.asarray(tids, dtype=np.int64),
        medias=np.asarray(mids, dtype=np.int64),
        landmarks=np.asarray(lms, dtype=np.float64).reshape(-1, 5, 2),
        faceness=np.asarray(scores, dtype=np.float64),
        pair_t1=np.asarray(t1, dtype=np.int64),
        pair_t2=np.asarray(t2, dtype=np.int64),
        pair_label=np.asarray(labels, dtype=np.int64),
    )


def _group_sum(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    out = np.zeros((n_groups, values.shape[1]), dtype=np.float64)
    out[g[starts]] = np.add.reduceat(values[order], starts, axis=0)
    return out


def template_features(
    image_feats: np.ndarray, templates: np.ndarray, medias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """insightface ``image2template_feature``: media mean, template sum, L2-normalise.

    Returns ``(features [T, D], template ids [T] sorted)``.
    """
    x = np.asarray(image_feats, dtype=np.float64)
    uniq_t, t_idx = np.unique(templates, return_inverse=True)
    pairs = np.stack([t_idx, np.asarray(medias)], axis=1)
    uniq_tm, g_idx = np.unique(pairs, axis=0, return_inverse=True)
    g_idx = g_idx.reshape(-1)
    media_mean = _group_sum(x, g_idx, len(uniq_tm)) / np.bincount(g_idx, minlength=len(uniq_tm))[:, None]
    tmpl = _group_sum(media_mean, uniq_tm[:, 0], len(uniq_t))
    return l2_normalize(tmpl), uniq_t


def template_pair_scores(
    tfeats: np.ndarray, tids: np.ndarray, t1: np.ndarray, t2: np.ndarray, *, chunk: int = 100_000
) -> np.ndarray:
    """Dot product of the template features of each pair (cosine, templates are unit length)."""
    i1 = np.searchsorted(tids, t1)
    i2 = np.searchsorted(tids, t2)
    for arr, ids in ((i1, t1), (i2, t2)):
        bad = (arr >= len(tids)) | (tids[np.minimum(arr, len(tids) - 1)] != ids)
        if bad.any():
            raise EfquantError(
                f"template {int(ids[np.argmax(bad)])} has a pair but no images", field="template"
            )
    out = np.empty(len(t1), dtype=np.float64)
    for s in range(0, len(t1), chunk):
        out[s : s + chunk] = np.einsum("ij,ij->i", tfeats[i1[s : s + chunk]], tfeats[i2[s : s + chunk]])
    return out


class IJBVerification(EmbeddingEvaluator):
    """IJB-B/IJB-C 1:1 verification (see module docstring for layout, options and the TAR rule).

    ``prefix`` is the meta files' prefix (``ijbb``/``ijbc``), inferred when the meta folder has one
    ``*_template_pair_label.txt``. ``image_dir``/``meta_dir`` are relative to ``root``.
    """

    name = "ijb"

    def __init__(
        self,
        root: str | Path,
        *,
        prefix: str | None = None,
        image_dir: str = "loose_crop",
        meta_dir: str = "meta",
        align: bool = False,
        use_flip: bool = True,
        use_norm_score: bool = True,
        use_detector_score: bool = True,
        fars: Sequence[float] = IJB_FARS,
        label: str | None = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise EfquantError("IJB root is not a folder", source=str(self.root), field="root")
        self.meta_dir = resolve_under_root(self.root, meta_dir, source=str(self.root), field="meta_dir")
        self.image_dir = resolve_under_root(self.root, image_dir, source=str(self.root), field="image_dir")
        for fld, d in (("meta_dir", self.meta_dir), ("image_dir", self.image_dir)):
            if not d.is_dir():
                raise EfquantError("folder not found", source=str(d), field=fld)
        if prefix is None:
            found = sorted(self.meta_dir.glob("*_template_pair_label.txt"))
            if len(found) != 1:
                raise EfquantError(
                    f"found {len(found)} *_template_pair_label.txt files; set prefix",
                    source=str(self.meta_dir),
                    field="prefix",
                )
            prefix = found[0].name[: -len("_template_pair_label.txt")]
        self.prefix = prefix
        self.align = align
        self.use_flip = use_flip
        self.use_norm_score = use_norm_score
        self.use_detector_score = use_detector_score
        self.fars = sorted(float(f) for f in fars)
        self.label = label or prefix
        self._data: tuple[ImageSet, IJBMeta] | None = None

    @property
    def mode(self) -> str:
        """insightface's test-mode tag, e.g. ``N1D1F1``."""
        return f"N{int(self.use_norm_score)}D{int(self.use_detector_score)}F{int(self.use_flip)}"

    @property
    def flip(self) -> bool:
        """``use_flip`` (insightface's name for the option) under the name the base class embeds with."""
        return self.use_flip

    def load(self) -> tuple[ImageSet, IJBMeta]:
        """Meta files and the image set, read once."""
        if self._data is None:
            meta = read_ijb_meta(self.meta_dir, self.prefix)
            src = str(self.meta_dir / f"{self.prefix}_face_tid_mid.txt")
            paths = [
                resolve_under_root(self.image_dir, n, source=src, field="image") for n in meta.image_names
            ]
            images = ImageSet.from_files(paths, landmarks=meta.landmarks if self.align else None)
            self._data = (images, meta)
        return self._data

    def score(self, feats: np.ndarray, data: tuple[ImageSet, IJBMeta]) -> EvalResult:
        images, meta = data
        img = feats.sum(axis=1).astype(np.float64) if self.use_flip else feats[:, 0].astype(np.float64)
        if not self.use_norm_score:
            img = l2_normalize(img)
        if self.use_detector_score:
            img = img * meta.faceness[:, None]
        tfeats, tids = template_features(img, meta.templates, meta.medias)
        scores = template_pair_scores(tfeats, tids, meta.pair_t1, meta.pair_t2)
        labels = meta.pair_label
        if labels.min() == labels.max():
            raise EfquantError(
                "the pair file needs both genuine (1) and impostor (0) pairs",
                source=str(self.meta_dir / f"{self.prefix}_template_pair_label.txt"),
            )
        tars = tar_at_far_nearest(labels, scores, self.fars)
        metrics = {far_key(f): t for f, t in tars.items()}
        metrics["auc"] = float(roc_auc_score(labels, scores))
        metrics["xnorm"] = xnorm(feats)
        fpr, tpr, _ = roc_curve(labels, scores)
        info = {
            "mode": self.mode,
            "tar_rule": "nearest_fpr",
            "n_images": len(images),
            "n_templates": int(len(tids)),
            "n_pairs": int(labels.size),
            "n_genuine": int(labels.sum()),
            "n_impostor": int(labels.size - labels.sum()),
            "aligned_here": self.align,
        }
        return EvalResult(self.label, self.name, metrics, Curve(fpr, tpr), info)
