"""Small generated images for the data tests (no real faces needed)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image


def jpeg_bytes(color: tuple[int, int, int] = (200, 30, 60), size: int = 112, fmt: str = "JPEG") -> bytes:
    """An encoded solid image whose left and right halves differ, so flips are visible."""
    img = Image.new("RGB", (size, size), color)
    img.paste((0, 0, 0), (0, 0, size // 2, size))
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=95)
    return buf.getvalue()


@pytest.fixture
def make_image():
    """Write an image file: make_image(path, color=..., size=..., fmt=...)."""

    def write(path: Path, color=(200, 30, 60), size: int = 112, fmt: str = "JPEG") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(color, size, fmt))
        return path

    return write


@pytest.fixture
def jpeg():
    return jpeg_bytes
