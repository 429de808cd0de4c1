"""On-disk cache of embeddings (and optionally decoded images), so teacher and student reuse work.

Entries are ``.npy`` files named by a hash of their key (model hash, dataset fingerprint, flip, ...).
They are written to a temporary file and moved into place, so a crash never leaves a half-written
entry; an unreadable entry is treated as a miss and rewritten.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from efquant_fx.files import atomic_path


def cache_key(*parts: object) -> str:
    """A short stable hash of the key parts (their ``str`` forms, in order)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()
    return digest[:32]


class FeatureCache:
    """A folder of ``<kind>-<key>.npy`` arrays."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key}.npy"

    def load(self, kind: str, key: str, *, mmap: bool = False) -> np.ndarray | None:
        """The cached array, or ``None`` when absent or unreadable."""
        path = self._path(kind, key)
        if not path.is_file():
            return None
        try:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None

    def save(self, kind: str, key: str, array: np.ndarray) -> Path:
        """Store ``array`` atomically (:func:`efquant_fx.files.atomic_path`)."""
        path = self._path(kind, key)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
        return path


def as_cache(cache: FeatureCache | str | Path | None) -> FeatureCache | None:
    """Accept a cache object or a folder path (as recipes give it)."""
    if cache is None or isinstance(cache, FeatureCache):
        return cache
    return FeatureCache(cache)
