"""Helpers for evaluator tests: tiny models and synthetic face images (``tests.eval.eval_helpers``)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn


class TinyNet(nn.Module):
    """Two conv layers -> 16-d embedding; deterministic weights from ``seed``."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=4, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        return self.conv2(x).mean(dim=(2, 3))


class MeanColor(nn.Module):
    """Embedding = mean normalised colour: solid-colour images give exactly known distances."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class CountingModel(nn.Module):
    """Wraps a model and counts forward calls (to prove the feature cache is used)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


#: the 8 corners of the RGB cube: normalised they are (+-1, +-1, +-1), never zero
CUBE_COLORS = [(r, g, b) for r in (0, 255) for g in (0, 255) for b in (0, 255)]


def solid_png(color: tuple[int, int, int], size: int = 112) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def face_like(seed: int, noise: float = 0.0, noise_seed: int = 0) -> np.ndarray:
    """A smooth random 112x112 RGB pattern per identity, plus optional per-image noise."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, size=(7, 7, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(small).resize((112, 112), Image.Resampling.BICUBIC), dtype=np.float64)
    if noise:
        img = img + np.random.default_rng(10_000 + noise_seed).normal(0, noise, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def save_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def shared_root() -> Path:
    """``$EFQUANT_SHARED``, default ``<repo root>/../shared``."""
    default = Path(__file__).resolve().parents[2].parent / "shared"
    return Path(os.environ.get("EFQUANT_SHARED", default))
