"""Closed-set 1:N identification (rank-k) on a gallery/probe folder pair.

Layout: ``<root>/<gallery>/<identity>/<image>`` and ``<root>/<probe>/<identity>/<image>``. Each
gallery identity becomes one template (sum of its flip-summed, L2-normalised image embeddings,
normalised again); every probe image is ranked against all templates by cosine similarity.
Probes of identities absent from the gallery are skipped and counted (``info['n_probes_skipped']``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from efquant_fx.errors import EfquantError
from efquant_fx.eval.base import EmbeddingEvaluator
from efquant_fx.eval.embed import l2_normalize
from efquant_fx.eval.images import ImageSet, list_image_files, resolve_under_root
from efquant_fx.eval.result import EvalResult


def _scan(folder: Path) -> list[tuple[Path, str]]:
    out: list[tuple[Path, str]] = []
    for ident in sorted(p for p in folder.iterdir() if p.is_dir()):
        out.extend((img, ident.name) for img in list_image_files(ident))
    if not out:
        raise EfquantError("no images in <identity>/ sub-folders", source=str(folder))
    return out


class Identification(EmbeddingEvaluator):
    """Rank-k identification accuracy (``rank1``, ``rank5`` ... per ``ranks``)."""

    name = "identification"

    def __init__(
        self,
        root: str | Path,
        *,
        gallery: str = "gallery",
        probe: str = "probe",
        ranks: Sequence[int] = (1, 5),
        flip: bool = True,
        label: str | None = None,
    ):
        self.root = Path(root)
        self.gallery_dir = resolve_under_root(self.root, gallery, source=str(self.root), field="gallery")
        self.probe_dir = resolve_under_root(self.root, probe, source=str(self.root), field="probe")
        for fld, d in (("gallery", self.gallery_dir), ("probe", self.probe_dir)):
            if not d.is_dir():
                raise EfquantError("folder not found", source=str(d), field=fld)
        if not ranks or any(int(r) < 1 for r in ranks):
            raise EfquantError(f"ranks must be positive integers, got {list(ranks)}", field="ranks")
        self.ranks = sorted({int(r) for r in ranks})
        self.flip = flip
        self.label = label or "identification"
        self._data: tuple[ImageSet, np.ndarray, np.ndarray, list[str]] | None = None

    def load(self) -> tuple[ImageSet, np.ndarray, np.ndarray, list[str]]:
        """One image set (gallery then probes), identity labels, gallery mask, identity names."""
        if self._data is None:
            gal = _scan(self.gallery_dir)
            prb = _scan(self.probe_dir)
            names = sorted({i for _, i in gal} | {i for _, i in prb})
            index = {n: k for k, n in enumerate(names)}
            entries = gal + prb
            labels = np.array([index[i] for _, i in entries], dtype=np.int64)
            is_gallery = np.r_[np.ones(len(gal), bool), np.zeros(len(prb), bool)]
            self._data = (ImageSet.from_files([p for p, _ in entries]), labels, is_gallery, names)
        return self._data

    def score(self, feats: np.ndarray, data: tuple[ImageSet, np.ndarray, np.ndarray, list[str]]) -> EvalResult:
        _, labels, is_gallery, names = data
        emb = l2_normalize(feats.sum(axis=1) if self.flip else feats[:, 0])
        g_lab = labels[is_gallery]
        g_ids = np.unique(g_lab)
        templates = np.zeros((len(g_ids), emb.shape[1]))
        np.add.at(templates, np.searchsorted(g_ids, g_lab), emb[is_gallery])
        templates = l2_normalize(templates)
        p_lab = labels[~is_gallery]
        known = np.isin(p_lab, g_ids)
        if not known.any():
            raise EfquantError("no probe identity is in the gallery", source=str(self.probe_dir))
        sims = emb[~is_gallery][known] @ templates.T
        true_col = np.searchsorted(g_ids, p_lab[known])
        true_sim = sims[np.arange(len(true_col)), true_col]
        rank = (sims > true_sim[:, None]).sum(axis=1)  # 0 = correct identity ranked first
        metrics = {f"rank{r}": float(np.mean(rank < r)) for r in self.ranks}
        info = {
            "n_gallery_identities": int(len(g_ids)),
            "n_probes": int(known.sum()),
            "n_probes_skipped": int((~known).sum()),
            "n_identities": len(names),
        }
        return EvalResult(self.label, self.name, metrics, None, info)
