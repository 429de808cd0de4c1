"""Image-folder layout ``root/<identity>/<image>`` (arcface_torch / ImageFolder convention).

Labels are the positions of the identity directory names in sorted order. Files whose extension
is not an image extension, files directly under ``root`` and deeper sub-directories are skipped and
counted as ``ignored``; hidden entries (``.name``) are skipped silently. A file with an image
extension that does not decode is listed and then counted as unreadable by validation.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from efquant_fx.data.base import FaceDataset
from efquant_fx.data.report import DataReport
from efquant_fx.data.transforms import FaceTransform
from efquant_fx.datakinds import BuildContext, register_dataset_kind
from efquant_fx.errors import EfquantError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


def scan_folder(root: str | Path) -> tuple[list[str], list[int], dict[int, str], int]:
    """(relative paths, labels, label -> identity name, ignored count) for ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise EfquantError("image folder not found (expected root/<identity>/<image>)", source=str(root))
    paths: list[str] = []
    labels: list[int] = []
    ignored = 0
    entries = sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name)
    identities = [e.name for e in entries if e.is_dir()]
    ignored += len(entries) - len(identities)
    for label, name in enumerate(identities):
        for entry in sorted(os.scandir(root / name), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                paths.append(f"{name}/{entry.name}")
                labels.append(label)
            else:
                ignored += 1
    return paths, labels, dict(enumerate(identities)), ignored


class ImageFolderDataset(FaceDataset):
    """Images under ``root``; keys are paths relative to it. Build with :func:`build_dataset`."""

    def __init__(
        self,
        root: str | Path,
        *,
        transform: FaceTransform | None = None,
        seed: int = 0,
    ):
        self.root = Path(root)
        paths, labels, names, ignored = scan_folder(self.root)
        report = DataReport(source=str(self.root), kind="folder", listed=len(paths), ignored=ignored)
        if not paths:
            raise EfquantError(
                "no images found (expected root/<identity>/<image> with image extensions)",
                source=str(self.root),
            )
        super().__init__(paths, labels, report, names=names, transform=transform, seed=seed)

    def read_bytes(self, key: Hashable) -> str:
        return str(self.root / str(key))

    def describe(self, key: Hashable) -> str:
        return str(self.root / str(key))


@register_dataset_kind("folder", keys=("root",), path_keys=("root",), required=("root",))
def folder_dataset(spec: dict[str, Any], ctx: BuildContext) -> FaceDataset:
    return ImageFolderDataset(spec["root"], transform=ctx.transform, seed=ctx.seed)
