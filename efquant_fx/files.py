"""Every file the package writes goes through here: checked output folders and atomic writes.

A run directory, a checkpoint or an export is read later by other programs (a resume, onnxruntime,
deployment scripts): a crash or a full disk must leave either the previous file or none, never a
truncated one, and never a stray temp file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from efquant_fx.errors import EfquantError


class FileWriteError(EfquantError, OSError):
    """A file could not be written (disk full, quota, permissions): one line naming the file.

    Also an ``OSError`` (with the original ``errno`` and ``strerror``), so callers that already
    explain a failed write in their own words, such as the fine-tune checkpoints, keep doing so.
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None,
                 errno: int | None = None, strerror: str | None = None):
        super().__init__(message, source=source, field=field)
        self.errno, self.strerror = errno, strerror

    def __str__(self) -> str:  # OSError would print "[Errno 28] ..." instead of the message
        return str(self.args[0]) if self.args else ""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; it replaces ``path`` only if the block succeeds.

    ``path`` is either the previous file or the complete new one; the temp file never stays behind.
    A failed write (``OSError``: disk full, quota, permissions) is a :class:`FileWriteError` naming
    ``path``; other exceptions pass through unchanged.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if isinstance(exc, EfquantError):
            raise
        kept = f"the previous {path.name} is intact" if path.is_file() else "nothing was written"
        raise FileWriteError(f"cannot write the file ({exc.strerror or exc}); {kept}", source=str(path),
                             errno=exc.errno, strerror=exc.strerror) from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through :func:`atomic_path`: a crash never leaves a truncated checkpoint."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


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


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            break
        missing.append(p)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for p in folders:  # deepest first; a folder something was written into stays
        try:
            p.rmdir()
        except OSError:
            break


@contextmanager
def undo_new_folders(path: str | Path) -> Iterator[Path]:
    """Remove ``path`` (and the parents made for it) again if the block fails and left them empty.

    A command that fails before writing (a run that does not reload, an evaluator that refuses its
    data) must not leave an empty ``export/`` or ``eval/`` folder that looks like output.
    """
    path = Path(path)
    created = _missing_folders(path.absolute())
    try:
        yield path
    except BaseException:
        _remove_empty(created)
        raise


def check_writable(out: str | Path, field: str = "--out", what: str = "the run directory", *,
                   keep: bool = True) -> Path:
    """Fail before any work when ``out`` cannot be written: create it and write a probe file.

    ``keep=False`` removes the folders the probe had to create: the check alone leaves nothing behind
    (for outputs written only at the end, once the work succeeded).
    """
    out = Path(out)
    created = _missing_folders(out.absolute())
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        _remove_empty(created)
        raise EfquantError(f"cannot write {what} here: not writable ({exc.strerror or exc})", source=str(out),
                           field=field) from None
    if not keep:
        _remove_empty(created)
    return out
