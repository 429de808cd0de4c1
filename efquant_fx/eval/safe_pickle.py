"""Read insightface ``.bin`` verification packs without letting the pickle run code.

A ``.bin`` pack is a pickle of ``(list of encoded images, list of bool)``. Plain ``pickle.load`` on a
downloaded file executes whatever callables the file names, so we use an unpickler whose
``find_class`` only hands out what real packs need:

* nothing at all for packs of ``bytes`` (Python 3) or ``str`` (Python 2, read as bytes);
* ``_codecs.encode(text, "latin1")`` — how Python 3 writes ``bytes`` at protocol 2;
* numpy array reconstruction for packs built with ``cv2.imencode`` (``build_eval_pack.py``):
  ``numpy[._]core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype`` and, for packs
  written at pickle protocol 5 (Python >= 3.8 ``HIGHEST_PROTOCOL``), ``numpy[._]core.numeric._frombuffer``,
  which only wraps a byte buffer as an array.

Anything else (``os.system``, ``builtins.eval``, ...) is refused with an :class:`EfquantError` before
it can be called.

Refusing code is not enough for a downloaded file: a few bytes can also make the unpickler allocate
gigabytes. Before unpickling, the opcodes are walked with :mod:`pickletools` (nothing is built) and a
memo index larger than the opcode count is refused (CPython sizes and zeroes its memo table to the
largest index: a 9-byte file could ask for 32 GB). Numpy arrays may not hold Python objects and an
empty array may not be larger than the file (real packs reconstruct ``shape (0,)``, then fill it).
"""

from __future__ import annotations

import codecs
import io
import math
import pickle
import pickletools
from pathlib import Path
from typing import Any

import numpy as np

from efquant_fx.errors import EfquantError


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` restricted to the one use protocol-2 ``bytes`` pickles make of it."""
    if not isinstance(obj, str) or codecs.lookup(encoding).name != "iso8859-1" or errors != "strict":
        raise pickle.UnpicklingError("_codecs.encode is only allowed as encode(str, 'latin1')")
    return obj.encode("latin1")


def _plain_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    """``numpy.dtype`` for plain data only: an object array could be sized to gigabytes of references."""
    dtype = np.dtype(spec, align, copy)
    if dtype.hasobject:
        raise pickle.UnpicklingError("numpy arrays of Python objects are not allowed in a verification pack")
    return dtype


_NUMPY_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
}
_PUT_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a verification pack can legitimately contain.

    ``max_bytes`` bounds the size of an array that ``_reconstruct`` may allocate before it is filled.
    """

    def __init__(self, file: Any, *, max_bytes: int, **kwargs: Any):
        super().__init__(file, **kwargs)
        self.max_bytes = max_bytes

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) == ("numpy", "dtype"):
            return _plain_dtype
        if (module, name) in _NUMPY_ALLOWED:
            found = super().find_class(module, name)
            return self._bounded(found) if name == "_reconstruct" else found
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def _bounded(self, reconstruct: Any) -> Any:
        def checked(subtype: Any, shape: Any, dtype: Any) -> Any:
            plain = _plain_dtype(dtype)
            if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
                raise pickle.UnpicklingError(f"bad array shape {shape!r}")
            if math.prod(shape) * plain.itemsize > self.max_bytes:
                raise pickle.UnpicklingError(f"an array of shape {shape} is larger than the file")
            return reconstruct(subtype, shape, dtype)

        return checked


def _check_opcodes(data: bytes, source: str) -> None:
    """Walk the opcodes without building anything; refuse a memo index no real pickle reaches."""
    try:
        for count, (op, arg, _) in enumerate(pickletools.genops(data)):
            if op.name in _PUT_OPCODES and (not isinstance(arg, int) or not 0 <= arg <= count):
                raise EfquantError(
                    f"not a readable pickle (memo index {arg} at opcode {count}: a real pack never goes that high)",
                    source=source,
                )
    except EfquantError:
        raise
    except Exception as exc:  # pickletools raises ValueError & co. on malformed opcodes or arguments
        raise EfquantError(f"not a readable pickle ({type(exc).__name__}: {exc})", source=source) from None


def restricted_loads(data: bytes, *, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`; Python-2 strings come back as bytes."""
    _check_opcodes(data, source)
    for encoding in ("ASCII", "bytes"):
        try:
            return RestrictedUnpickler(io.BytesIO(data), max_bytes=len(data), encoding=encoding).load()
        except UnicodeDecodeError:
            continue
        except pickle.UnpicklingError as exc:
            if "refusing to load global" in str(exc):
                raise EfquantError(
                    f"{exc}: this file is not a plain verification pack (it would run code when unpickled)",
                    source=source,
                ) from None
            raise EfquantError(f"not a readable pickle ({exc})", source=source) from None
        except Exception as exc:  # a malformed pickle can fail in many ways; all are the user's file
            raise EfquantError(
                f"not a readable pickle ({type(exc).__name__}: {exc})", source=source
            ) from None
    raise EfquantError("not a readable pickle (undecodable Python 2 strings)", source=source)


def _as_bytes(item: Any) -> bytes | None:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()
    return None


def _as_bool(item: Any) -> bool | None:
    if isinstance(item, (bool, np.bool_)):
        return bool(item)
    if isinstance(item, (int, np.integer)) and int(item) in (0, 1):
        return bool(item)
    return None


def load_verification_bin(path: str | Path) -> tuple[list[bytes], list[bool]]:
    """Read an insightface ``.bin`` pack: ``2N`` encoded images (pair ``i`` = ``2i, 2i+1``), ``N`` labels."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EfquantError(
            f"cannot read verification pack: {exc.strerror or exc}", source=str(path)
        ) from None
    return parse_verification_bin(data, source=str(path))


def parse_verification_bin(data: bytes, *, source: str) -> tuple[list[bytes], list[bool]]:
    """:func:`load_verification_bin` for bytes already in memory; ``source`` names them in errors."""
    path = source
    obj = restricted_loads(data, source=str(path))
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise EfquantError("expected a pickled (images, issame) pair", source=str(path))
    raw_bins, raw_same = obj
    if not isinstance(raw_bins, (list, tuple)) or not isinstance(raw_same, (list, tuple, np.ndarray)):
        raise EfquantError("expected (list of encoded images, list of bool)", source=str(path))
    bins: list[bytes] = []
    for i, item in enumerate(raw_bins):
        blob = _as_bytes(item)
        if blob is None:
            raise EfquantError(
                f"image {i} is {type(item).__name__}, expected encoded bytes", source=str(path)
            )
        bins.append(blob)
    issame: list[bool] = []
    for i, item in enumerate(raw_same):
        flag = _as_bool(item)
        if flag is None:
            raise EfquantError(f"label {i} is {item!r}, expected a bool", source=str(path))
        issame.append(flag)
    if len(bins) != 2 * len(issame):
        raise EfquantError(
            f"{len(bins)} images for {len(issame)} pairs; a pack holds exactly two images per pair",
            source=str(path),
        )
    if not issame:
        raise EfquantError("the pack holds no pairs", source=str(path))
    return bins, issame
