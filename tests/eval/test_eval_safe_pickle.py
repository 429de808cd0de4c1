"""The ``.bin`` reader accepts real pack layouts and refuses pickles that would run code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from efquant_fx.errors import EfquantError
from efquant_fx.eval.safe_pickle import load_verification_bin, restricted_loads


class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _CallsEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_refuses_pickle_calling_os_system(tmp_path, protocol):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([b"x", _RunsShell(marker)], [True]), protocol=protocol))
    with pytest.raises(EfquantError) as err:
        load_verification_bin(evil)
    msg = str(err.value)
    assert str(evil) in msg and "system" in msg and "\n" not in msg
    assert not marker.exists()


def test_refuses_builtins_eval():
    with pytest.raises(EfquantError, match="builtins.eval"):
        restricted_loads(pickle.dumps(_CallsEval()))


def test_loads_bytes_pack(tmp_path):
    path = tmp_path / "lfw.bin"
    path.write_bytes(
        pickle.dumps(([b"a", b"b", b"c", b"d"], [True, False]), protocol=pickle.HIGHEST_PROTOCOL)
    )
    bins, issame = load_verification_bin(path)
    assert bins == [b"a", b"b", b"c", b"d"] and issame == [True, False]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_loads_cv2_style_numpy_pack(tmp_path, protocol):
    # build_eval_pack.py stores cv2.imencode() results: uint8 arrays of shape [n, 1]
    arrays = [np.frombuffer(bytes([i, 255, 216]), dtype=np.uint8).reshape(-1, 1) for i in range(2)]
    path = tmp_path / "pack.bin"
    path.write_bytes(pickle.dumps((arrays, [True]), protocol=protocol))
    bins, issame = load_verification_bin(path)
    assert bins == [bytes([0, 255, 216]), bytes([1, 255, 216])] and issame == [True]


def test_loads_python2_str_pack(tmp_path):
    # Protocol-2 pickle as Python 2 writes str: SHORT_BINSTRING opcodes holding raw JPEG bytes
    body = b"\x80\x02(]q\x00(U\x02\xff\xd8U\x02\xff\xd9e]q\x01\x88at."
    bins, issame = load_verification_bin(_write(tmp_path, body))
    assert bins == [b"\xff\xd8", b"\xff\xd9"] and issame == [True]


def _write(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "p.bin"
    p.write_bytes(data)
    return p


@pytest.mark.parametrize(
    "obj, message",
    [
        (([b"a", b"b", b"c"], [True]), "two images per pair"),
        (([b"a", 3], [True]), "image 1"),
        (([b"a", b"b"], ["yes"]), "label 0"),
        ({"a": 1}, "expected a pickled"),
    ],
)
def test_malformed_packs_are_explained(tmp_path, obj, message):
    with pytest.raises(EfquantError, match=message):
        load_verification_bin(_write(tmp_path, pickle.dumps(obj)))


def test_truncated_and_missing_files(tmp_path):
    with pytest.raises(EfquantError, match="not a readable pickle"):
        load_verification_bin(_write(tmp_path, pickle.dumps(([b"a", b"b"], [True]))[:-5]))
    with pytest.raises(EfquantError, match="cannot read"):
        load_verification_bin(tmp_path / "absent.bin")
