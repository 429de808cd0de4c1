"""RecordIO reader on bytes written by hand in the documented format, and the writer round trip."""

from __future__ import annotations

import struct

import pytest
import torch

from efquant_fx.data import RecordIODataset, RecordIOReader, build_dataset, write_recordio
from efquant_fx.data.recordio import RecordIOFormatError, frame_record, pack_payload, unpack_payload

MAGIC = struct.pack("<I", 0xCED7230A)


def frame(cflag: int, data: bytes) -> bytes:
    """magic, lrecord (cflag << 29 | length), data, zero padding to 4 bytes."""
    return MAGIC + struct.pack("<I", (cflag << 29) | len(data)) + data + b"\0" * (-len(data) % 4)


def header(label, data: bytes = b"", id_: int = 0) -> bytes:
    if isinstance(label, tuple):
        return struct.pack("<IfQQ", len(label), 0.0, id_, 0) + struct.pack(f"<{len(label)}f", *label) + data
    return struct.pack("<IfQQ", 0, float(label), id_, 0) + data


def write_insightface_rec(tmp_path, jpeg):
    """Images 1..4 (ids 0,0,1,1), identity records 5..6, record 0 = (5, 7); image 3 is split in 3 parts."""
    images = {
        1: (0, jpeg((10, 20, 30))),
        2: (0, jpeg((40, 50, 60))),
        3: (1, jpeg((70, 80, 90))),
        4: (1, b"junk"),
    }
    records: dict[int, bytes] = {0: frame(0, header((5.0, 7.0)))}
    special = b""
    for key, (label, data) in images.items():
        payload = header(float(label), data, key)
        if key == 3:
            # the magic at two 4-aligned offsets splits the payload: cflag 1, 2, 3
            payload += b"\0" * (-len(payload) % 4)
            cut1 = len(payload)
            payload += MAGIC + b"abcd" + MAGIC + b"xyz"
            special = payload
            records[key] = frame(1, payload[:cut1]) + frame(2, b"abcd") + frame(3, b"xyz")
        else:
            records[key] = frame(0, payload)
    records[5] = frame(0, header((1.0, 3.0)))
    records[6] = frame(0, header((3.0, 5.0)))
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    blob, lines = b"", []
    for key in sorted(records):
        lines.append(f"{key}\t{len(blob)}")
        blob += records[key]
    rec.write_bytes(blob)
    idx.write_text("\n".join(lines) + "\n")
    return rec, idx, special


def test_reader_on_hand_written_bytes(tmp_path, jpeg):
    rec, idx, special = write_insightface_rec(tmp_path, jpeg)
    reader = RecordIOReader(rec, idx)
    head = reader.header(0)
    assert head.flag == 2 and head.label == (5.0, 7.0)
    assert reader.read(3) == special  # continuation parts joined, magic restored between them
    assert frame_record(special) == rec.read_bytes()[reader.offsets[3] : reader.offsets[4]]
    assert reader.header(3).label == 1.0 and reader.image_bytes(3).startswith(jpeg((70, 80, 90)))
    assert reader.header(5).label == (1.0, 3.0)


def test_insightface_dataset_uses_header_and_counts_bad_record(tmp_path, jpeg):
    rec, _, _ = write_insightface_rec(tmp_path, jpeg)
    dataset, report = build_dataset({"kind": "recordio", "root": str(tmp_path)}, train=False)
    assert (report.listed, report.selected, report.loaded, report.unreadable) == (4, 4, 3, 1)
    assert "#4" in report.unreadable_paths[0]
    assert dataset.keys == [1, 2, 3] and dataset.labels == [0, 0, 1]
    image, label = dataset[2]
    assert image.shape == (3, 112, 112) and label == 1
    assert image[:, 0, -1].tolist() == pytest.approx([(c - 127.5) / 127.5 for c in (70, 80, 90)], abs=0.05)
    assert isinstance(RecordIODataset(rec), RecordIODataset)  # a .rec path works too


def test_writer_round_trip_without_header_and_without_idx(tmp_path, jpeg):
    rec, idx = tmp_path / "x.rec", tmp_path / "x.idx"
    items = [(0, 3.0, jpeg((1, 2, 3))), (1, (7.0, 1.0), jpeg((4, 5, 6)) + MAGIC + b"tail"), (2, 3.0, b"")]
    write_recordio(rec, idx, items)

    def check(reader):
        assert reader.keys == [0, 1, 2]
        for key, label, data in items:
            head, body = unpack_payload(reader.read(key))
            assert head.label == (label if isinstance(label, float) else tuple(label)) and head.id == key
            assert body == data

    check(RecordIOReader(rec, idx))
    check(RecordIOReader(rec.rename(tmp_path / "y.rec")))  # no y.idx: offsets found by scanning
    dataset = RecordIODataset(tmp_path / "y.rec")
    assert dataset.original_labels == [3, 7, 3] and dataset.labels == [0, 1, 0]
    assert dataset[1][0].shape == torch.Size([3, 112, 112])


def test_bad_bytes_raise_format_errors(tmp_path):
    rec = tmp_path / "bad.rec"
    rec.write_bytes(b"\x00" * 16)
    with pytest.raises(RecordIOFormatError, match="bad magic"):
        RecordIOReader(rec)
    with pytest.raises(RecordIOFormatError, match="IRHeader"):
        unpack_payload(b"short")
    assert unpack_payload(pack_payload((1.0, 2.0), b"img"))[1] == b"img"
