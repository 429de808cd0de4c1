"""Write stand-ins for the files the tutorial asks you to bring, so every tutorial command runs anywhere.

    python scripts/make_tutorial_files.py my            # -> my/backbone.pth, my/faces/, my/pairs.txt

* ``backbone.pth``: an insightface-layout MobileFaceNet state dict with *random* weights (what
  ``torch.save(model.state_dict())`` of arcface_torch's ``mbf`` gives, untrained), its BatchNorm
  statistics set on the stand-in images so that its embeddings are not degenerate;
* ``faces/<identity>/<identity>_<n>.jpg``: 112x112 RGB JPEGs, a smooth random pattern per identity plus
  per-image noise and shifts — not faces;
* ``pairs.txt``: an LFW-format pair list over ``faces/`` (same and different identities).

The numbers the tutorial prints on these files mean nothing; the commands are the same ones you run
on your own trained backbone and aligned faces. Deterministic (seeded), a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

IDENTITIES = 12
IMAGES_PER_IDENTITY = 4
SIZE = 112


def identity_pattern(rng: np.random.Generator) -> np.ndarray:
    """A smooth colour field: a coarse 7x7 grid upsampled to 112x112."""
    coarse = rng.uniform(0, 255, size=(7, 7, 3))
    idx = np.linspace(0, 6, SIZE)
    lo = np.floor(idx).astype(int)
    hi = np.minimum(lo + 1, 6)
    w = (idx - lo)[:, None, None]
    rows = coarse[lo] * (1 - w) + coarse[hi] * w
    w = (idx - lo)[None, :, None]
    return rows[:, lo] * (1 - w) + rows[:, hi] * w


def write_faces(root: Path, rng: np.random.Generator) -> list[str]:
    from PIL import Image

    names = [f"person_{i:02d}" for i in range(IDENTITIES)]
    for name in names:
        base = identity_pattern(rng)
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in range(1, IMAGES_PER_IDENTITY + 1):
            shift = rng.integers(-4, 5, size=2)
            img = np.roll(base, tuple(shift), axis=(0, 1)) + rng.normal(0, 12, size=base.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{name}_{n:04d}.jpg",
                                                                         quality=95)
    return names


def write_pairs(path: Path, names: list[str], rng: np.random.Generator, sets: int = 2) -> None:
    """LFW View-2 layout: ``sets`` folds, each ``n`` same pairs then ``n`` different pairs."""
    n = len(names) // sets
    lines = [f"{sets}\t{n}"]
    for s in range(sets):
        fold = names[s * n:(s + 1) * n]
        for name in fold:
            a, b = rng.choice(np.arange(1, IMAGES_PER_IDENTITY + 1), size=2, replace=False)
            lines.append(f"{name}\t{a}\t{b}")
        for i, name in enumerate(fold):
            other = fold[(i + 1 + int(rng.integers(0, n - 1))) % n]
            lines.append(f"{name}\t{rng.integers(1, IMAGES_PER_IDENTITY + 1)}\t{other}\t"
                         f"{rng.integers(1, IMAGES_PER_IDENTITY + 1)}")
    path.write_text("\n".join(lines) + "\n")


def set_batchnorm_statistics(model, faces: Path) -> None:
    """Running mean/var from the images (a random network's default statistics shrink its output to ~0)."""
    import torch
    from PIL import Image

    images = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in sorted(faces.rglob("*.jpg"))]
    x = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) - 127.5) / 127.5
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the one pass
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder to create (backbone.pth, faces/, pairs.txt)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from efquant_fx.models import create_model

    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    names = write_faces(args.out / "faces", rng)
    model = create_model("mobilefacenet")
    set_batchnorm_statistics(model, args.out / "faces")
    torch.save(model.state_dict(), args.out / "backbone.pth")
    write_pairs(args.out / "pairs.txt", names, rng)
    print(f"wrote {args.out}/backbone.pth (random MobileFaceNet), {len(names) * IMAGES_PER_IDENTITY} images "
          f"of {len(names)} identities in {args.out}/faces, {2 * len(names)} pairs in {args.out}/pairs.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
