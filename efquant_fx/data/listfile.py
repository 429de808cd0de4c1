"""List-file datasets: one ``relative/path.jpg<TAB or spaces>label`` line per image.

This is the format of the shared LFW fine-tuning list (``lfw112/finetune.txt``). Paths are
relative to ``root`` (default: the list file's directory); the label is the last whitespace-
separated field, so paths may contain spaces. Blank lines and ``#`` comments are skipped.
Absolute paths and paths that leave ``root`` (``../``) are refused: the check is lexical, so a
symlinked image directory inside ``root`` still works.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from efquant_fx.data.base import FaceDataset
from efquant_fx.data.report import DataReport
from efquant_fx.data.transforms import FaceTransform
from efquant_fx.datakinds import BuildContext, register_dataset_kind
from efquant_fx.errors import EfquantError


def safe_relative(rel: str, *, source: str, field: str) -> str:
    """``rel`` normalised with '/' separators, or an EfquantError if it is absolute or escapes."""
    if not rel:
        raise EfquantError("empty path", source=source, field=field)
    posix = rel.replace("\\", "/")
    if PurePosixPath(posix).is_absolute() or PureWindowsPath(rel).drive or PureWindowsPath(rel).is_absolute():
        raise EfquantError(
            f"absolute path {rel!r} refused; paths must be relative to the root", source=source, field=field
        )
    norm = os.path.normpath(posix).replace("\\", "/")
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise EfquantError(f"path {rel!r} escapes the data root; refused", source=source, field=field)
    return norm


def _parse_lines(lines: Iterable[str], list_path: Path) -> tuple[list[str], list[int]]:
    paths: list[str] = []
    labels: list[int] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{list_path}:{number}"
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise EfquantError("expected 'relative/path<TAB>label'", source=where, field="line")
        rel, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise EfquantError(f"label {label_text!r} is not an integer", source=where, field="label") from None
        if label < 0:
            raise EfquantError(f"label {label} is negative", source=where, field="label")
        paths.append(safe_relative(rel.strip(), source=where, field="path"))
        labels.append(label)
    return paths, labels


def read_list(list_path: str | Path) -> tuple[list[str], list[int]]:
    """Parse a list file into (relative paths, labels); malformed lines raise with their line number."""
    list_path = Path(list_path)
    if not list_path.is_file():
        raise EfquantError("list file not found", source=str(list_path))
    try:
        with open(list_path, encoding="utf-8") as fh:
            paths, labels = _parse_lines(fh, list_path)
    except UnicodeDecodeError as exc:
        raise EfquantError(f"not a UTF-8 text file (undecodable byte {exc.object[exc.start:exc.start + 1]!r})",
                           source=str(list_path)) from None
    except OSError as exc:
        raise EfquantError(f"cannot read list file ({exc.strerror or exc})", source=str(list_path)) from None
    if not paths:
        raise EfquantError("list file has no entries", source=str(list_path))
    return paths, labels


class ListFileDataset(FaceDataset):
    """Images named by a list file; keys are root-relative paths. Build with :func:`build_dataset`."""

    def __init__(
        self,
        list_path: str | Path,
        root: str | Path | None = None,
        *,
        transform: FaceTransform | None = None,
        seed: int = 0,
    ):
        self.list_path = Path(list_path)
        self.root = Path(root) if root is not None else self.list_path.parent
        paths, labels = read_list(self.list_path)  # first: without a root, the root is the list's folder
        if not self.root.is_dir():
            raise EfquantError("data root directory not found", source=str(self.root), field="root")
        report = DataReport(source=str(self.list_path), kind="list", listed=len(paths))
        super().__init__(paths, labels, report, transform=transform, seed=seed)

    def read_bytes(self, key: Hashable) -> str:
        return str(self.root / str(key))

    def describe(self, key: Hashable) -> str:
        return str(self.root / str(key))


@register_dataset_kind("list", keys=("root", "list"), path_keys=("root", "list"), required=("list",))
def list_dataset(spec: dict[str, Any], ctx: BuildContext) -> FaceDataset:
    return ListFileDataset(spec["list"], spec.get("root"), transform=ctx.transform, seed=ctx.seed)
