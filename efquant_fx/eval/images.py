"""Face images for evaluation: safe decoding, paths confined to a data root, decode-once image sets.

Every image becomes RGB uint8 112x112 (the ArcFace preprocessing contract; normalisation to
``(x - 127.5) / 127.5`` happens at embedding time). Square images of another size are resized like
insightface's verification loader does; other shapes must be aligned first (or given landmarks).
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from efquant_fx.errors import EfquantError
from efquant_fx.eval.align import align_face
from efquant_fx.eval.cache import FeatureCache, cache_key
from efquant_fx.eval.progress import progress_bar

IMAGE_SIZE = 112
#: Far above any face crop; refuses decompression bombs before Pillow allocates their pixels.
MAX_IMAGE_PIXELS = 40_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

_FORMAT_VERSION = "efquant-images-v1"


def resolve_under_root(root: Path, relative: str, *, source: str, field: str | None = None) -> Path:
    """``root / relative``, refusing absolute paths and ``..`` that would leave ``root``.

    The check is lexical: a list file must not point outside its data folder, while symlinks
    placed inside the folder by its owner are followed as usual.
    """
    if not relative or "\x00" in relative:
        raise EfquantError(f"empty or invalid image path {relative!r}", source=source, field=field)
    if os.path.isabs(relative) or Path(relative).drive:
        raise EfquantError(
            f"image path {relative!r} is absolute; paths must be relative to {root}",
            source=source,
            field=field,
        )
    base = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.join(base, relative))
    if os.path.commonpath([base, full]) != base:
        raise EfquantError(
            f"image path {relative!r} escapes the data root {root}", source=source, field=field
        )
    return Path(full)


def decode_image(src: bytes | Path, *, name: str) -> np.ndarray:
    """Decode an encoded image (bytes or file) to RGB uint8 ``HxWx3``; any failure names ``name``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src
            with Image.open(fp) as im:
                width, height = im.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise EfquantError(
                        f"image is {width}x{height}, larger than the {MAX_IMAGE_PIXELS} pixel limit",
                        source=name,
                    )
                return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except EfquantError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise EfquantError(f"image refused as a decompression bomb ({exc})", source=name) from None
    except FileNotFoundError:
        raise EfquantError("image file not found", source=name) from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        raise EfquantError(f"cannot decode image ({type(exc).__name__}: {exc})", source=name) from None


def to_face(image: np.ndarray, *, name: str, landmarks: np.ndarray | None = None) -> np.ndarray:
    """Bring a decoded image to 112x112: align with landmarks, resize a square, or refuse."""
    if landmarks is not None:
        return align_face(image, landmarks, IMAGE_SIZE)
    height, width = image.shape[:2]
    if (height, width) == (IMAGE_SIZE, IMAGE_SIZE):
        return image
    if height == width:
        resized = Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        return np.asarray(resized, dtype=np.uint8)
    raise EfquantError(
        f"image is {width}x{height}; expected an aligned 112x112 face (align it first or give 5 landmarks)",
        source=name,
    )


def list_image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageSet:
    """An ordered list of face images that is decoded at most once.

    Items are encoded bytes (``.bin`` packs) or files. ``fingerprint`` identifies the pixels (file
    contents, order, landmarks) and keys the feature cache, so that the same data under another
    path still hits the cache and changed files never do. Identical items (LFW pairs reuse images)
    are decoded and embedded once: :meth:`unique` maps items to distinct contents. Decoded pixels
    stay in memory, or, when a :class:`FeatureCache` is given, in a memory-mapped ``.npy`` there.
    """

    def __init__(
        self,
        items: Sequence[bytes | Path],
        names: Sequence[str],
        *,
        landmarks: np.ndarray | None = None,
        fingerprint: str | None = None,
    ):
        if len(items) != len(names):
            raise ValueError("items and names differ in length")
        if landmarks is not None:
            landmarks = np.asarray(landmarks, dtype=np.float64).reshape(len(items), 5, 2)
        self.items = list(items)
        self.names = list(names)
        self.landmarks = landmarks
        self._fingerprint = fingerprint
        self._digests: list[bytes] | None = None
        self._unique: tuple[np.ndarray, np.ndarray] | None = None
        self._pixels: np.ndarray | None = None

    @classmethod
    def from_files(cls, paths: Sequence[Path], *, landmarks: np.ndarray | None = None) -> ImageSet:
        """Images read from files (errors name the file)."""
        return cls(list(paths), [str(p) for p in paths], landmarks=landmarks)

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, index: int) -> bytes:
        item, name = self.items[index], self.names[index]
        if not isinstance(item, Path):
            return bytes(item)
        try:
            return item.read_bytes()
        except FileNotFoundError:
            raise EfquantError("image file not found", source=name) from None
        except OSError as exc:
            raise EfquantError(f"cannot read image: {exc.strerror or exc}", source=name) from None

    def digests(self) -> list[bytes]:
        """Per-item SHA-256 of the encoded bytes (and landmarks, when given), computed once."""
        if self._digests is None:
            out = []
            for i in range(len(self)):
                h = hashlib.sha256(self._read(i))
                if self.landmarks is not None:
                    h.update(np.ascontiguousarray(self.landmarks[i], dtype="<f8").tobytes())
                out.append(h.digest())
            self._digests = out
        return self._digests

    @property
    def fingerprint(self) -> str:
        """Hash of the encoded contents, their order and landmarks (or the one given at creation)."""
        if self._fingerprint is None:
            h = hashlib.sha256(_FORMAT_VERSION.encode())
            for d in self.digests():
                h.update(d)
            if self.landmarks is not None:
                h.update(b"landmarks")
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def unique(self) -> tuple[np.ndarray, np.ndarray]:
        """``(first, inverse)``: index of each distinct item's first occurrence, and item -> distinct."""
        if self._unique is None:
            seen: dict[bytes, int] = {}
            inverse = np.empty(len(self), dtype=np.int64)
            first: list[int] = []
            for i, d in enumerate(self.digests()):
                k = seen.setdefault(d, len(first))
                if k == len(first):
                    first.append(i)
                inverse[i] = k
            self._unique = (np.asarray(first, dtype=np.int64), inverse)
        return self._unique

    def decode(self, index: int) -> np.ndarray:
        """One face, RGB uint8 112x112x3."""
        name = self.names[index]
        image = decode_image(self.items[index], name=name)
        lm = None if self.landmarks is None else self.landmarks[index]
        return to_face(image, name=name, landmarks=lm)

    def pixels(self, *, cache: FeatureCache | None = None, progress: bool | None = None) -> np.ndarray:
        """The distinct faces (see :meth:`unique`) as uint8 ``[U, 112, 112, 3]``, decoded once."""
        if self._pixels is not None:
            return self._pixels
        first, _ = self.unique()
        shape = (len(first), IMAGE_SIZE, IMAGE_SIZE, 3)
        key = cache_key("images", self.fingerprint)
        if cache is not None:
            hit = cache.load("images", key, mmap=True)
            if hit is not None and hit.shape == shape and hit.dtype == np.uint8:
                self._pixels = hit
                return hit
        out = np.empty(shape, dtype=np.uint8)
        with progress_bar(len(first), "decoding images", progress) as advance:
            for k, i in enumerate(first):
                out[k] = self.decode(int(i))
                advance(1)
        if cache is not None:
            cache.save("images", key, out)
            hit = cache.load("images", key, mmap=True)
            self._pixels = hit if hit is not None else out
        else:
            self._pixels = out
        return self._pixels

    def forget_pixels(self) -> None:
        """Drop decoded pixels (to free memory once every model has been evaluated)."""
        self._pixels = None
