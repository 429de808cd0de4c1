"""Teacher-student agreement on images without identities (the data-free quickstart's yardstick).

With no labelled faces, accuracy cannot be measured; what can be is whether the compressed model
embeds like its teacher (per-image cosine) and ranks pairs like its teacher (Spearman correlation
of all pairwise scores: a verification threshold only cares about that order).
"""

from __future__ import annotations

import torch
from scipy.stats import spearmanr
from torch import nn


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    out = [model(images[i : i + batch_size]).float() for i in range(0, images.shape[0], batch_size)]
    return torch.nn.functional.normalize(torch.cat(out), dim=1)


def agreement(teacher: nn.Module, student: nn.Module, images: torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """Embedding cosine (mean, worst) and pair-score rank agreement between two models."""
    t, s = embed(teacher, images, batch_size), embed(student, images, batch_size)
    cos = (t * s).sum(1)
    iu = torch.triu_indices(len(t), len(t), offset=1)
    pair_t, pair_s = (t @ t.T)[iu[0], iu[1]], (s @ s.T)[iu[0], iu[1]]
    rho = spearmanr(pair_t.numpy(), pair_s.numpy()).statistic if pair_t.numel() > 1 else float("nan")
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "pair_rank_spearman": float(rho), "images": int(images.shape[0]), "pairs": int(pair_t.numel())}
