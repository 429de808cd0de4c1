"""insightface ``train.rec`` / ``train.idx`` without MXNet (retired; we only need its byte format).

Byte format (dmlc-core ``recordio.cc``, mxnet ``recordio.py``), all little-endian:

* A record is ``uint32 magic = 0xCED7230A``, ``uint32 lrecord``, payload, zero padding to a multiple
  of 4 bytes. ``lrecord``: upper 3 bits ``cflag``, lower 29 bits the payload length.
* ``cflag`` 0 is a whole record. The writer splits a payload wherever the magic appears at a
  4-aligned offset: parts are flagged 1 (first), 2 (middle), 3 (last); the magic itself is not
  written and the reader puts it back between parts.
* Payload = ``IRHeader`` struct ``'IfQQ'`` (uint32 flag, float32 label, uint64 id, uint64 id2;
  24 bytes). If ``flag > 0``, ``flag`` float32 labels follow (header label 0). Then the image (JPEG).
* ``train.idx``: text lines ``key<TAB>byte offset``.
* insightface layout: record 0 has ``flag > 0`` and labels ``(id_start, id_end)``; image keys are
  ``1 .. id_start-1``; keys ``id_start .. id_end-1`` are one per identity with labels
  ``(first image key, end image key)`` and no image. Without that header every key is an image.
"""

from __future__ import annotations

import bisect
import math
import os
import struct
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from efquant_fx.data.base import FaceDataset
from efquant_fx.data.report import DataReport
from efquant_fx.data.transforms import FaceTransform, UnreadableImage
from efquant_fx.datakinds import BuildContext, register_dataset_kind
from efquant_fx.errors import EfquantError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")
IR_HEADER = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1


class RecordIOFormatError(EfquantError):
    """The .rec/.idx bytes do not follow the RecordIO format."""


@dataclass(frozen=True)
class IRHeader:
    """Decoded image-record header; ``label`` is a float, or a tuple when ``flag > 0``."""

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int


# ------------------------------------------------------------------ encoding


def _frame(cflag: int, data: bytes) -> bytes:
    return _FRAME.pack(MAGIC, (cflag << 29) | len(data)) + data


def frame_record(payload: bytes) -> bytes:
    """Frame one payload exactly as dmlc's ``RecordIOWriter::WriteRecord`` does (incl. splitting)."""
    if len(payload) >= 1 << 29:
        raise ValueError("RecordIO records must be smaller than 2**29 bytes")
    out = bytearray()
    start = 0
    for i in range(0, len(payload) - len(payload) % 4, 4):
        if payload[i : i + 4] == _MAGIC_BYTES:
            out += _frame(1 if start == 0 else 2, payload[start:i])
            start = i + 4
    out += _frame(3 if start else 0, payload[start:])
    out += b"\0" * (-len(payload) % 4)
    return bytes(out)


def pack_payload(label: float | Sequence[float], data: bytes = b"", id: int = 0, id2: int = 0) -> bytes:
    """IRHeader + optional label array + image bytes (mxnet ``recordio.pack``)."""
    if isinstance(label, (int, float)):
        return IR_HEADER.pack(0, float(label), id, id2) + data
    labels = np.asarray(label, dtype="<f4")
    return IR_HEADER.pack(labels.size, 0.0, id, id2) + labels.tobytes() + data


def unpack_payload(payload: bytes, source: str | None = None) -> tuple[IRHeader, bytes]:
    """Split a payload into its header and the image bytes (mxnet ``recordio.unpack``)."""
    if len(payload) < IR_HEADER.size:
        raise RecordIOFormatError(f"record of {len(payload)} bytes is shorter than the 24-byte IRHeader",
                                  source=source)
    flag, label, id_, id2 = IR_HEADER.unpack_from(payload)
    offset = IR_HEADER.size
    if flag > 0:
        end = offset + 4 * flag
        if end > len(payload):
            raise RecordIOFormatError(f"label array of {flag} floats runs past the record end", source=source)
        labels = tuple(float(x) for x in np.frombuffer(payload, dtype="<f4", count=flag, offset=offset))
        return IRHeader(flag, labels, id_, id2), payload[end:]
    return IRHeader(flag, float(label), id_, id2), payload[offset:]


def write_recordio(
    rec: str | Path,
    idx: str | Path,
    items: Iterable[tuple[int, float | Sequence[float], bytes]],
) -> None:
    """Write ``(key, label, image bytes)`` items as an indexed RecordIO pair (header id = key).

    For an insightface-style file, make key 0 ``(0, (id_start, id_end), b"")`` and add one identity
    record per class. Used by the tests and for small conversions; the bytes follow the module
    docstring (payloads containing the magic are split into continuation records).
    """
    with open(rec, "wb") as rec_fh, open(idx, "w", encoding="ascii") as idx_fh:
        for key, label, data in items:
            idx_fh.write(f"{int(key)}\t{rec_fh.tell()}\n")
            rec_fh.write(frame_record(pack_payload(label, data, id=int(key))))


# ------------------------------------------------------------------ reading


def read_index(idx: str | Path) -> dict[int, int]:
    """``train.idx`` as key -> byte offset."""
    offsets: dict[int, int] = {}
    with open(idx, encoding="ascii", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                key, offset = int(parts[0]), int(parts[1])
            except (ValueError, IndexError):
                raise RecordIOFormatError(
                    "expected 'key<TAB>offset'", source=f"{idx}:{number}", field="index"
                ) from None
            if offset < 0:
                raise RecordIOFormatError(f"negative byte offset {offset}", source=f"{idx}:{number}", field="index")
            offsets[key] = offset
    return offsets


def read_record_at(fh: BinaryIO, offset: int, source: str = "") -> bytes:
    """The whole payload starting at ``offset``, joining continuation parts."""
    if offset < 0:
        raise RecordIOFormatError(f"negative byte offset {offset}", source=source)
    fh.seek(offset)
    parts: list[bytes] = []
    while True:
        frame = fh.read(_FRAME.size)
        if len(frame) != _FRAME.size:
            raise RecordIOFormatError(f"truncated record at byte {fh.tell() - len(frame)}", source=source)
        magic, lrecord = _FRAME.unpack(frame)
        if magic != MAGIC:
            raise RecordIOFormatError(f"bad magic 0x{magic:08X} at byte {fh.tell() - 8}", source=source)
        cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
        data = fh.read(length)
        if len(data) != length:
            raise RecordIOFormatError(f"record at byte {offset} is truncated", source=source)
        fh.seek(-length % 4, os.SEEK_CUR)
        parts.append(data)
        if cflag in (0, 3):
            break
        if cflag not in (1, 2):
            raise RecordIOFormatError(f"invalid cflag {cflag} at byte {offset}", source=source)
    return _MAGIC_BYTES.join(parts)


def scan_offsets(rec: str | Path) -> dict[int, int]:
    """Offsets of every record when there is no ``.idx`` (keys are 0, 1, 2, ... in file order)."""
    offsets: dict[int, int] = {}
    size = os.path.getsize(rec)
    with open(rec, "rb") as fh:
        position = 0
        while position < size:
            offsets[len(offsets)] = position
            read_record_at(fh, position, str(rec))
            position = fh.tell()
    return offsets


class RecordIOReader:
    """Random access to an indexed ``.rec``; safe across DataLoader worker processes.

    The file handle is opened lazily per process (and dropped when pickled), so forked or spawned
    workers never share a seek position.
    """

    def __init__(self, rec: str | Path, idx: str | Path | None = None):
        self.rec = Path(rec)
        if not self.rec.is_file():
            raise EfquantError("RecordIO file not found", source=str(self.rec), field="rec")
        if idx is None and self.rec.with_suffix(".idx").is_file():
            idx = self.rec.with_suffix(".idx")
        self.idx = Path(idx) if idx is not None else None
        self.offsets = read_index(self.idx) if self.idx is not None else scan_offsets(self.rec)
        self._fh: BinaryIO | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fh"], state["_pid"] = None, -1
        return state

    def _file(self) -> BinaryIO:
        if self._fh is None or self._pid != os.getpid():
            self._fh = open(self.rec, "rb")  # kept open: random access, one handle per process
            self._pid = os.getpid()
        return self._fh

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    @property
    def keys(self) -> list[int]:
        return sorted(self.offsets)

    def read(self, key: int) -> bytes:
        """The raw payload of record ``key`` (header + labels + image)."""
        if key not in self.offsets:
            raise RecordIOFormatError(f"key {key} is not in the index", source=str(self.idx or self.rec))
        return read_record_at(self._file(), self.offsets[key], str(self.rec))

    def header(self, key: int) -> IRHeader:
        return unpack_payload(self.read(key), f"{self.rec}#{key}")[0]

    def image_bytes(self, key: int) -> bytes:
        return unpack_payload(self.read(key), f"{self.rec}#{key}")[1]


def _as_int(value: float, what: str, source: str) -> int:
    if not math.isfinite(value):
        raise RecordIOFormatError(f"{what} is {value}, not a number", source=source)
    return int(value)


def _scalar_label(header: IRHeader, source: str = "") -> int:
    label = header.label[0] if isinstance(header.label, tuple) else header.label
    return _as_int(label, f"label of record {header.id}", source)


def _keys_in(keys: list[int], start: int, end: int) -> list[int]:
    """The sorted ``keys`` in ``[start, end)``; a corrupt header's huge range costs nothing."""
    return keys[bisect.bisect_left(keys, start) : bisect.bisect_left(keys, end)]


def list_records(reader: RecordIOReader) -> tuple[list[int], list[int]]:
    """(image keys, labels), using insightface's header and identity records when present."""
    keys = reader.keys
    src = str(reader.rec)
    first = reader.header(0) if 0 in reader.offsets else None
    if first is None or first.flag == 0 or not isinstance(first.label, tuple) or len(first.label) < 2:
        return keys, [_scalar_label(reader.header(k), src) for k in keys]
    id_start = _as_int(first.label[0], "record 0 identity start", src)
    id_end = _as_int(first.label[1], "record 0 identity end", src)
    identity_keys = _keys_in(keys, id_start, id_end)
    image_keys: list[int] = []
    labels: list[int] = []
    if identity_keys and len(identity_keys) == id_end - id_start:
        # one header read per identity: the ranges are contiguous, all images share the label
        for ident in identity_keys:
            span = reader.header(ident).label
            if not isinstance(span, tuple) or len(span) < 2:
                raise RecordIOFormatError(f"identity record {ident} has no (start, end) label", source=src)
            members = _keys_in(keys, _as_int(span[0], f"identity record {ident} start", src),
                               _as_int(span[1], f"identity record {ident} end", src))
            if members:
                label = _scalar_label(reader.header(members[0]), src)
                image_keys.extend(members)
                labels.extend([label] * len(members))
        return image_keys, labels
    image_keys = _keys_in(keys, 1, id_start)
    return image_keys, [_scalar_label(reader.header(k), src) for k in image_keys]


class RecordIODataset(FaceDataset):
    """Images from an insightface ``train.rec`` (+ ``train.idx``); keys are record keys.

    ``path`` is the ``.rec`` file or a directory holding ``train.rec``/``train.idx``. A record that
    fails to parse or decode is counted as unreadable like a bad file.
    """

    def __init__(
        self,
        path: str | Path,
        idx: str | Path | None = None,
        *,
        transform: FaceTransform | None = None,
        seed: int = 0,
    ):
        path = Path(path)
        rec = path / "train.rec" if path.is_dir() else path
        if idx is None and path.is_dir() and (path / "train.idx").is_file():
            idx = path / "train.idx"
        self.reader = RecordIOReader(rec, idx)
        keys, labels = list_records(self.reader)
        report = DataReport(source=str(rec), kind="recordio", listed=len(keys))
        if not keys:
            raise EfquantError("no image records found", source=str(rec))
        super().__init__(keys, labels, report, transform=transform, seed=seed)

    def read_bytes(self, key: Hashable) -> bytes:
        try:
            return self.reader.image_bytes(int(key))  # type: ignore[call-overload]
        except RecordIOFormatError as exc:
            raise UnreadableImage(str(exc)) from None

    def describe(self, key: Hashable) -> str:
        return f"{self.reader.rec}#{key}"


@register_dataset_kind("recordio", keys=("root", "idx"), path_keys=("root", "idx"), required=("root",))
def recordio_dataset(spec: dict[str, Any], ctx: BuildContext) -> FaceDataset:
    return RecordIODataset(spec["root"], spec.get("idx"), transform=ctx.transform, seed=ctx.seed)
