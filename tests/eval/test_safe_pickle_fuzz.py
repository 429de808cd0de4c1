"""Fuzzing the ``.bin`` verification-pack reader and the evaluation image decoder with random and
mutated bytes: the only outcomes allowed are a clean result or an :class:`EfquantError` (no other
exception, no hang, no code run)."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from efquant_fx.errors import EfquantError
from efquant_fx.eval.images import decode_image
from efquant_fx.eval.safe_pickle import parse_verification_bin
from tests.test_reliability_properties import FAST, mutated, no_hang


def _png(seed: int, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _pack(kind: str, protocol: int) -> bytes:
    """A real-looking pack: 2 pairs of tiny PNGs, as bytes (insightface) or uint8 arrays (cv2.imencode)."""
    images = [_png(i) for i in range(4)]
    if kind == "numpy":
        images = [np.frombuffer(b, dtype=np.uint8) for b in images]
    return pickle.dumps((images, [True, False]), protocol=protocol)


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow's notes on broken tags

PACKS = [_pack(kind, protocol) for kind in ("bytes", "numpy") for protocol in (2, 4, 5)]


@pytest.fixture(autouse=True)
def _no_shell(monkeypatch):
    """A pickle that got past the unpickler and ran ``os.system`` would fail the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("the .bin reader ran os.system")

    monkeypatch.setattr(os, "system", refuse)


def check_pack(blob: bytes) -> None:
    try:
        with no_hang():
            bins, issame = parse_verification_bin(blob, source="fuzz.bin")
    except EfquantError as exc:
        assert str(exc).startswith("fuzz.bin: ")
        return
    assert len(bins) == 2 * len(issame) > 0
    assert all(isinstance(b, bytes) for b in bins) and all(isinstance(s, bool) for s in issame)


@FAST
@given(blob=st.binary(max_size=256))
def test_random_bytes(blob):
    check_pack(blob)


@FAST
@given(blob=st.sampled_from(PACKS).flatmap(mutated))
def test_mutated_packs(blob):
    check_pack(blob)


@FAST
@given(blob=st.sampled_from([b"\x80\x02", b"\x80\x04\x95", b"\x80\x05\x95"]).flatmap(
    lambda head: st.binary(max_size=64).map(lambda tail: head + tail)))
def test_random_bytes_after_a_pickle_header(blob):
    check_pack(blob)


def test_a_memo_index_bomb_is_refused_before_allocating():
    """9 bytes asking CPython's unpickler for a memo table of 2**21 entries (2**32 would be 32 GB)."""
    with pytest.raises(EfquantError, match=r"bomb.bin: not a readable pickle \(memo index 2097152 at opcode 2"):
        parse_verification_bin(b"\x80\x02Nr\x00\x00\x20\x00.", source="bomb.bin")


@pytest.mark.parametrize("how", ["reconstruct", "setstate"])
def test_object_arrays_are_refused(how):
    """An object array is zero-filled at its declared size: a tiny file could claim gigabytes."""

    class Huge:
        def __reduce__(self):
            return (np._core.multiarray._reconstruct, (np.ndarray, (10**6,), b"O"))

    blob = pickle.dumps(Huge() if how == "reconstruct" else np.zeros(3, dtype=object), protocol=2)
    with pytest.raises(EfquantError, match=r"numpy arrays of Python objects are not allowed"):
        parse_verification_bin(blob, source="objects.bin")


def test_an_empty_array_larger_than_the_file_is_refused():
    class Big:
        def __reduce__(self):
            return (np._core.multiarray._reconstruct, (np.ndarray, (10**6,), b"B"))

    with pytest.raises(EfquantError, match=r"an array of shape \(1000000,\) is larger than the file"):
        parse_verification_bin(pickle.dumps(Big(), protocol=2), source="big.bin")


def test_the_packs_being_mutated_are_valid():
    for blob in PACKS:
        bins, issame = parse_verification_bin(blob, source="pack.bin")
        assert issame == [True, False] and decode_image(bins[0], name="0").shape == (12, 12, 3)


IMAGES = [_png(7)] + [
    (lambda fmt: (lambda buf: (Image.new("RGB", (16, 16), (90, 20, 200)).save(buf, fmt), buf.getvalue())[1])(
        io.BytesIO()))(fmt) for fmt in ("JPEG", "BMP", "WEBP", "TIFF")]


@FAST
@given(blob=st.binary(max_size=128) | st.sampled_from(IMAGES).flatmap(mutated))
def test_image_decoder_on_random_and_mutated_files(blob):
    try:
        with no_hang():
            pixels = decode_image(blob, name="fuzz.png")
    except EfquantError as exc:
        assert str(exc).startswith("fuzz.png: ")
        return
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
