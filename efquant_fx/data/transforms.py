"""insightface preprocessing: RGB 112x112, (x - 127.5) / 127.5, CHW float; random flip for training.

Decoding lives here too, so every dataset kind fails the same way on a bad file
(:class:`UnreadableImage`) and the pixel-count limit is applied everywhere.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = 112
MAX_IMAGE_PIXELS = IMAGE_SIZE * IMAGE_SIZE * 64
"""Aligned faces are 112x112; anything above 64x that many pixels is treated as unreadable."""

PILLOW_MAX_IMAGE_PIXELS = 40_000_000
"""Pillow's process-wide bomb limit (warning above it, DecompressionBombError above twice it).

The limit above is checked per image, right after Pillow has read the header and before any pixel is
decoded; Pillow's global limit is only a backstop, set no lower than evaluation's (an unaligned photo
with landmarks may be a few megapixels), so importing this module does not make evaluation refuse them.
"""

if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > PILLOW_MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = PILLOW_MAX_IMAGE_PIXELS


class UnreadableImage(Exception):
    """A file or record that cannot be decoded as an image (the dataset counts it, never crashes)."""


@contextmanager
def _open_within_limit(source: bytes | str | Path, max_pixels: int) -> Iterator[Image.Image]:
    """Open ``source`` (path or encoded bytes) lazily, refusing it from its header if it has too many pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
        with Image.open(fp) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise UnreadableImage(f"{width}x{height} exceeds the {max_pixels}-pixel limit")
            yield img


def decode_image(source: bytes | str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode a path or encoded bytes to an RGB PIL image, or raise :class:`UnreadableImage`."""
    try:
        with _open_within_limit(source, max_pixels) as img:
            img.load()
            return img.convert("RGB")
    except UnreadableImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImage(f"too many pixels: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.UnidentifiedImageError) as exc:
        # UnidentifiedImageError: not an image; OSError: truncated/corrupt data or missing file.
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from None


def check_image_header(source: bytes | str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Cheap check (format + size + Pillow ``verify``) without a full decode; raises UnreadableImage."""
    try:
        with _open_within_limit(source, max_pixels) as img:
            img.verify()
    except UnreadableImage:
        raise
    except Exception as exc:  # Pillow's verify raises a wide range of types on bad data
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from None


class FaceTransform:
    """PIL image -> float tensor [3, size, size] in [-1, 1], as insightface models expect.

    Images of another size are resized (bilinear) to ``size`` x ``size``; this does not align faces,
    so feed images that are already aligned to the ArcFace template. With ``train=True`` the image is
    flipped horizontally with probability 0.5, drawn from ``generator`` so that augmentation can be
    replayed exactly (datasets pass a generator seeded from (seed, epoch, index)).
    """

    def __init__(self, train: bool = False, size: int = IMAGE_SIZE, flip_prob: float = 0.5):
        self.train = train
        self.size = int(size)
        self.flip_prob = float(flip_prob)

    def __repr__(self) -> str:
        return f"FaceTransform(train={self.train}, size={self.size}, flip_prob={self.flip_prob})"

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
        flip = (
            self.train and self.flip_prob > 0 and float(torch.rand((), generator=generator)) < self.flip_prob
        )
        array = np.asarray(img, dtype=np.float32)  # HWC
        if flip:
            array = array[:, ::-1]
        # numpy, not torch ops: tiny tensors under torch's intra-op threads are slow on busy CPUs
        chw = np.ascontiguousarray(array.transpose(2, 0, 1))
        chw -= 127.5
        chw /= 127.5
        return torch.from_numpy(chw)
