"""Identity-balanced P x K batch sampler."""

from __future__ import annotations

from collections import Counter

import pytest

from efquant_fx.data import IdentityBalancedBatchSampler
from efquant_fx.errors import EfquantError

# identities with 1, 2, 3, ... images: small ones force sampling with replacement
LABELS = [label for label in range(12) for _ in range(label % 6 + 1)]


def batches(sampler):
    return [list(b) for b in sampler]


def test_every_batch_has_p_identities_with_k_images():
    sampler = IdentityBalancedBatchSampler(LABELS, identities_per_batch=4, images_per_identity=3, seed=0)
    assert len(sampler) == len(LABELS) // 12 and sampler.batch_size == 12
    out = batches(sampler)
    assert len(out) == len(sampler)
    for batch in out:
        counts = Counter(LABELS[i] for i in batch)
        assert len(batch) == 12 and len(counts) == 4 and set(counts.values()) == {3}
        for start in range(0, 12, 3):  # identity-major: K consecutive of one identity
            assert len({LABELS[i] for i in batch[start : start + 3]}) == 1
        for label in counts:
            members = [i for i in batch if LABELS[i] == label]
            if LABELS.count(label) >= 3:  # enough images: no repeats within the identity
                assert len(set(members)) == 3
            else:  # fewer than K: all of them appear, the rest with replacement
                assert set(members) == {i for i, lab in enumerate(LABELS) if lab == label}


def test_deterministic_per_seed_and_epoch():
    a = IdentityBalancedBatchSampler(LABELS, 4, 3, seed=7)
    b = IdentityBalancedBatchSampler(LABELS, 4, 3, seed=7)
    assert batches(a) == batches(b)
    first = batches(a)
    a.set_epoch(1)
    assert batches(a) != first
    b.set_epoch(1)
    assert batches(a) == batches(b)
    assert batches(IdentityBalancedBatchSampler(LABELS, 4, 3, seed=8)) != first


def test_two_ranks_get_disjoint_batches_of_equal_number():
    labels = [label for label in range(40) for _ in range(4)]  # 160 images, one identity cycle per epoch
    whole = IdentityBalancedBatchSampler(labels, 4, 4, seed=3)
    ranks = [IdentityBalancedBatchSampler(labels, 4, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for sampler in (whole, *ranks):
        sampler.set_epoch(2)
    r0, r1 = (batches(s) for s in ranks)
    assert len(r0) == len(r1) == len(ranks[0]) == 5
    assert {i for b in r0 for i in b}.isdisjoint({i for b in r1 for i in b})
    assert sorted(i for b in r0 + r1 for i in b) == list(range(160))
    interleaved = [b for pair in zip(r0, r1, strict=True) for b in pair]
    assert interleaved == batches(whole)


def test_length_override_and_errors():
    sampler = IdentityBalancedBatchSampler(LABELS, 2, 2, num_batches=7, world_size=2, rank=1)
    assert len(sampler) == 3 and len(batches(sampler)) == 3
    with pytest.raises(EfquantError, match="distinct identities"):
        IdentityBalancedBatchSampler([0, 0, 1], 3, 2)
    with pytest.raises(EfquantError, match="rank"):
        IdentityBalancedBatchSampler(LABELS, 2, 2, rank=2, world_size=2)
