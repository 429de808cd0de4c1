"""Where exported files go: a checked output folder and atomic writes (temp file + ``os.replace``).

An export is read by other programs (onnxruntime, deployment scripts): a crash or a full disk must
leave either the previous file or none, never a truncated one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from efquant_fx.errors import EfquantError


def output_dir(out_dir: str | Path, field: str = "export.out_dir") -> Path:
    """Create ``out_dir`` if needed and check it is a writable folder (one-line error otherwise)."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise EfquantError("output path exists and is not a folder", source=str(path), field=field)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EfquantError(f"cannot create output folder ({exc.strerror or exc})", source=str(path),
                           field=field) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise EfquantError("output folder is not writable", source=str(path), field=field)
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
