"""Fuzzing the RecordIO reader (``.rec`` + ``.idx``) and the training image decoder with random and
mutated bytes: a dataset is built, or an :class:`EfquantError` (``RecordIOFormatError``) explains
why not; never another exception, never a hang. Bad images inside a readable file are counted."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from efquant_fx.data import build_dataset, write_recordio
from efquant_fx.data.recordio import RecordIOFormatError, RecordIOReader, list_records
from efquant_fx.data.transforms import UnreadableImage, decode_image
from efquant_fx.errors import EfquantError
from tests.test_reliability_properties import FAST, mutated, no_hang

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _valid_pair(tmp: Path) -> tuple[bytes, bytes]:
    """An insightface-layout file: header (5, 7), images 1..4 of identities 0, 0, 1, 1, identity records."""
    items = [(0, (5.0, 7.0), b""), (1, 0.0, _jpeg(1)), (2, 0.0, _jpeg(2)), (3, 1.0, _jpeg(3)), (4, 1.0, _jpeg(4)),
             (5, (1.0, 3.0), b""), (6, (3.0, 5.0), b"")]
    write_recordio(tmp / "v.rec", tmp / "v.idx", items)
    return (tmp / "v.rec").read_bytes(), (tmp / "v.idx").read_bytes()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("recordio")


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> tuple[bytes, bytes]:
    return _valid_pair(tmp_path_factory.mktemp("valid"))


def check(work: Path, rec: bytes, idx: bytes | None) -> None:
    folder = work / "data"
    folder.mkdir(exist_ok=True)
    (folder / "train.rec").write_bytes(rec)
    (folder / "train.idx").unlink(missing_ok=True)
    if idx is not None:
        (folder / "train.idx").write_bytes(idx)
    try:
        with no_hang():
            dataset, report = build_dataset({"kind": "recordio", "root": str(folder)}, train=True)
            for i in range(len(dataset)):
                image, label = dataset[i]
                assert image.shape == (3, 112, 112) and 0 <= label < dataset.num_classes
    except EfquantError as exc:
        assert str(folder) in str(exc), str(exc)  # the message names the file
        return
    assert report.loaded == len(dataset) > 0


def test_the_file_being_mutated_is_valid(work, valid):
    rec, idx = valid
    (work / "v.rec").write_bytes(rec)
    (work / "v.idx").write_bytes(idx)
    assert list_records(RecordIOReader(work / "v.rec")) == ([1, 2, 3, 4], [0, 0, 1, 1])


@FAST
@given(rec=st.binary(max_size=200), with_idx=st.booleans(), idx=st.binary(max_size=40))
def test_random_bytes(work, rec, with_idx, idx):
    check(work, rec, idx if with_idx else None)


@FAST
@given(data=st.data())
def test_mutated_rec_and_idx(work, valid, data):
    rec, idx = valid
    which = data.draw(st.sampled_from(["rec", "idx", "both", "rec without idx"]))
    if which in ("rec", "both", "rec without idx"):
        rec = data.draw(mutated(rec, max_edits=3))
    if which in ("idx", "both"):
        idx = data.draw(mutated(idx, max_edits=2))
    check(work, rec, None if which == "rec without idx" else idx)


MAGIC = struct.pack("<I", 0xCED7230A)


@FAST
@given(records=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                                  st.floats(width=32) | st.integers(-5, 5).map(float), st.binary(max_size=12)),
                        min_size=1, max_size=6))
def test_well_framed_records_with_random_headers(work, records):
    """Right magic and lengths, random cflags, header flags, label counts, ids and labels (NaN, inf, huge)."""
    rec = b""
    for cflag, flag, id_, label, tail in records:
        payload = struct.pack("<IfQQ", flag % 5, label, id_, 0) + struct.pack("<f", label) * (flag % 5) + tail
        rec += MAGIC + struct.pack("<I", (cflag << 29) | len(payload)) + payload + b"\0" * (-len(payload) % 4)
    check(work, rec, None)


def test_corrupt_headers_are_explained(work):
    def frame(payload: bytes) -> bytes:
        return MAGIC + struct.pack("<I", len(payload)) + payload + b"\0" * (-len(payload) % 4)

    def records(rec: bytes) -> tuple[list[int], list[int]]:
        (work / "n.rec").write_bytes(rec)
        return list_records(RecordIOReader(work / "n.rec"))  # no n.idx: offsets found by scanning

    image = frame(struct.pack("<IfQQ", 0, 1.0, 1, 0) + _jpeg(1))
    with pytest.raises(RecordIOFormatError, match="n.rec: record 0 identity start is nan, not a number"):
        records(frame(struct.pack("<IfQQff", 2, 0.0, 0, 0, float("nan"), 7.0)) + image)
    # identity records claimed up to key 3e38: only the keys that exist are looked at (no endless range)
    assert records(frame(struct.pack("<IfQQff", 2, 0.0, 0, 0, 2.0, 3e38)) + image) == ([1], [1])
    (work / "n.idx").write_text("0\t-8\n")
    with pytest.raises(RecordIOFormatError, match=r"n.idx:1: index: negative byte offset -8"):
        RecordIOReader(work / "n.rec", work / "n.idx")


IMAGES = [_jpeg(5)] + [
    (lambda fmt: (lambda buf: (Image.new("RGB", (16, 16), (90, 20, 200)).save(buf, fmt), buf.getvalue())[1])(
        io.BytesIO()))(fmt) for fmt in ("PNG", "BMP", "GIF", "WEBP")]


@FAST
@given(blob=st.binary(max_size=128) | st.sampled_from(IMAGES).flatmap(mutated))
def test_training_decoder_on_random_and_mutated_images(blob):
    try:
        with no_hang():
            image = decode_image(blob)
    except UnreadableImage:
        return
    assert image.mode == "RGB" and image.size[0] * image.size[1] > 0
