"""The shared LFW-112 dev split parses as documented (needs $EFQUANT_SHARED, default ../shared)."""

from __future__ import annotations

import numpy as np
import pytest

from efquant_fx.eval.dense import DenseVerification
from efquant_fx.eval.images import decode_image
from efquant_fx.eval.pairs import read_pairs
from efquant_fx.eval.safe_pickle import load_verification_bin
from tests.eval.eval_helpers import shared_root

pytestmark = pytest.mark.real_data


@pytest.fixture
def lfw():
    path = shared_root() / "data" / "lfw112"
    if not (path / "dev_pairs.bin").is_file():
        pytest.skip(f"no LFW-112 dev split under {path} (set EFQUANT_SHARED)")
    return path


def test_dev_bin_and_txt_agree(lfw):
    bins, issame = load_verification_bin(lfw / "dev_pairs.bin")
    pairs = read_pairs(lfw / "dev_pairs.txt", lfw / "images")
    assert len(issame) == 1800 and sum(issame) == 900 and len(bins) == 3600
    assert pairs.n_sets == 3 and len(pairs) == 1800 and pairs.issame == issame
    for i in (0, 1, 299, 300, 901, 1799):  # same and different pairs, first and last fold
        for k, path in ((0, pairs.left[i]), (1, pairs.right[i])):
            from_bin = decode_image(bins[2 * i + k], name=f"bin[{2 * i + k}]")
            from_file = decode_image(path, name=str(path))
            assert from_bin.shape == (112, 112, 3)
            np.testing.assert_array_equal(from_bin, from_file)


def test_dense_dev_protocol_counts(lfw):
    images, labels, names = DenseVerification(lfw / "images", pairs=lfw / "dev_pairs.txt").load()
    counts = np.bincount(labels).astype(np.int64)
    n = int(counts.sum())
    genuine = int((counts * (counts - 1) // 2).sum())
    assert (len(names), len(images)) == (1241, 3321)
    assert genuine == 26_576 and n * (n - 1) // 2 - genuine == 5_486_284
