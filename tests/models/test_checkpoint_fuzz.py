"""Fuzzing the checkpoint reader (``torch.load(weights_only=True)`` behind one error type) with random
bytes and mutated real checkpoints: a state dict of tensors or an :class:`EfquantError`, nothing else."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from efquant_fx.errors import EfquantError
from efquant_fx.models.checkpoint import read_state_dict
from tests.test_reliability_properties import FAST, mutated, no_hang


def _saved(obj, *, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch's note on odd headers

STATE = {"conv.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "bn.num_batches_tracked": torch.tensor(3)}
CHECKPOINTS = [_saved(STATE), _saved(STATE, legacy=True), _saved({"state_dict_backbone": STATE}),
               pickle.dumps({"fc.weight": 1.0}, protocol=2)]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


def check(work: Path, blob: bytes) -> None:
    path = work / "backbone.pth"
    path.write_bytes(blob)
    try:
        with no_hang():
            state = read_state_dict(path)
    except EfquantError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
        assert "weights_only=False" not in str(exc)  # never suggest loading it unsafely
        return
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_the_checkpoints_being_mutated_load(work):
    path = work / "ok.pth"
    path.write_bytes(CHECKPOINTS[0])
    assert torch.equal(read_state_dict(path)["conv.weight"], STATE["conv.weight"])


@FAST
@given(blob=st.binary(max_size=256))
def test_random_bytes(work, blob):
    check(work, blob)


@FAST
@given(blob=st.sampled_from(CHECKPOINTS).flatmap(mutated))
def test_mutated_checkpoints(work, blob):
    check(work, blob)
