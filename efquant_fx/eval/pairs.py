"""Pair lists: LFW ``pairs.txt`` (View 2) and plain ``path1 path2 label`` files.

LFW format: a header ``<sets> <pairs per set>`` (tab or space), then per set ``name n1 n2``
(same person) and ``name1 n1 name2 n2`` (different people) lines; the image is
``<root>/<name>/<name>_<n:04d>.jpg``. Plain format: ``path1 path2 label`` with label 1/0 (or
true/false), paths relative to the data root; blank lines and ``#`` comments are ignored.
Every path is confined to the data root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from efquant_fx.errors import EfquantError
from efquant_fx.eval.images import resolve_under_root


@dataclass(frozen=True)
class PairList:
    """Pairs of image files with same/different labels, in file order."""

    left: list[Path]
    right: list[Path]
    issame: list[bool]
    #: folds declared by an LFW header (``None`` for plain lists)
    n_sets: int | None = None

    def __len__(self) -> int:
        return len(self.issame)


def lfw_image_path(root: Path, name: str, number: int, *, source: str, field: str) -> Path:
    """``<root>/<name>/<name>_<number:04d>.jpg``, refusing names that leave ``root``."""
    return resolve_under_root(root, f"{name}/{name}_{number:04d}.jpg", source=source, field=field)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise EfquantError("pairs file not found", source=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EfquantError(f"cannot read pairs file ({exc})", source=str(path)) from None


def _is_lfw_header(fields: list[str]) -> bool:
    # isdecimal, not isdigit: '²' is a digit that int() refuses
    return len(fields) == 2 and all(f.isdecimal() and len(f) < 10 for f in fields)


def _parse_label(text: str, *, source: str, field: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "same"):
        return True
    if low in ("0", "false", "diff", "different"):
        return False
    raise EfquantError(f"label {text!r} is not 1/0 or true/false", source=source, field=field)


def read_pairs(path: str | Path, root: str | Path) -> PairList:
    """Parse a pairs file of either format (detected from the first line) against data ``root``."""
    path, root = Path(path), Path(root)
    src = str(path)
    lines = _read_lines(path)
    content = [
        (i + 1, ln.split()) for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip().startswith("#")
    ]
    if not content:
        raise EfquantError("the pairs file is empty", source=src)
    left: list[Path] = []
    right: list[Path] = []
    same: list[bool] = []
    first_no, first = content[0]
    if _is_lfw_header(first):
        n_sets, per_set = int(first[0]), int(first[1])
        for no, f in content[1:]:
            where = f"line {no}"
            try:
                if len(f) == 3:
                    name, a, b = f[0], int(f[1]), int(f[2])
                    left.append(lfw_image_path(root, name, a, source=src, field=where))
                    right.append(lfw_image_path(root, name, b, source=src, field=where))
                    same.append(True)
                elif len(f) == 4:
                    left.append(lfw_image_path(root, f[0], int(f[1]), source=src, field=where))
                    right.append(lfw_image_path(root, f[2], int(f[3]), source=src, field=where))
                    same.append(False)
                else:
                    raise EfquantError(f"expected 3 or 4 fields, got {len(f)}", source=src, field=where)
            except ValueError:
                raise EfquantError("image numbers must be integers", source=src, field=where) from None
        expected = n_sets * per_set * 2
        if len(same) != expected:
            raise EfquantError(
                f"header {n_sets}x{per_set} promises {expected} pairs, found {len(same)}",
                source=src,
                field=f"line {first_no}",
            )
        return PairList(left, right, same, n_sets=n_sets)
    for no, f in content:
        where = f"line {no}"
        if len(f) != 3:
            raise EfquantError(f"expected 'path1 path2 label', got {len(f)} fields", source=src, field=where)
        left.append(resolve_under_root(root, f[0], source=src, field=where))
        right.append(resolve_under_root(root, f[1], source=src, field=where))
        same.append(_parse_label(f[2], source=src, field=where))
    return PairList(left, right, same)


def lfw_identities(path: str | Path) -> list[str]:
    """Every identity named in an LFW ``pairs.txt``, in first-seen order."""
    path = Path(path)
    lines = _read_lines(path)
    if not lines or not _is_lfw_header(lines[0].split()):
        raise EfquantError(
            "not an LFW pairs file (no '<sets> <pairs>' header)", source=str(path), field="line 1"
        )
    seen: dict[str, None] = {}
    for no, ln in enumerate(lines[1:], start=2):
        f = ln.split()
        if not f:
            continue
        if len(f) == 3:
            seen.setdefault(f[0])
        elif len(f) == 4:
            seen.setdefault(f[0])
            seen.setdefault(f[2])
        else:
            raise EfquantError(f"expected 3 or 4 fields, got {len(f)}", source=str(path), field=f"line {no}")
    return list(seen)
