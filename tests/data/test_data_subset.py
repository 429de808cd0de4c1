"""Subset selection: deterministic per seed, honest about shortfalls."""

from __future__ import annotations

from collections import Counter

import pytest

from efquant_fx.data import build_dataset, select_subset
from efquant_fx.errors import EfquantError

LABELS = [label for label in range(30) for _ in range(label % 5 + 1)]  # 90 images, 1..5 per identity


def test_deterministic_for_a_seed():
    a = select_subset(LABELS, max_images=40, seed=1)
    assert a == select_subset(LABELS, max_images=40, seed=1)
    assert a.indices != select_subset(LABELS, max_images=40, seed=2).indices
    assert len(a.indices) == 40 and a.indices == sorted(a.indices) and not a.notes


def test_identities_are_taken_whole_and_filters_apply():
    sub = select_subset(LABELS, max_identities=6, min_images_per_identity=3, seed=0)
    counts = Counter(LABELS[i] for i in sub.indices)
    assert len(counts) == 6 == sub.identities and all(c >= 3 for c in counts.values())
    assert all(c == LABELS.count(lab) for lab, c in counts.items())
    assert "drops 12 of 30 identities (18 images)" in sub.notes[0]
    capped = select_subset(LABELS, max_images=10, min_images_per_identity=2, seed=0)
    assert all(c >= 2 for c in Counter(LABELS[i] for i in capped.indices).values())


def test_shortfall_is_reported_not_silent():
    sub = select_subset(LABELS, max_images=14000, seed=0)
    assert len(sub.indices) == 90
    assert "asked for max_images=14000 but only 90 images are available" in sub.notes[0]
    sub = select_subset(LABELS, max_identities=100, seed=0)
    assert "only 30 identities are available" in sub.notes[0]
    with pytest.raises(EfquantError, match="max_images"):
        select_subset(LABELS, max_images=0)
    with pytest.raises(EfquantError, match="no images left"):
        select_subset(LABELS, min_images_per_identity=6)


def test_shortfall_reaches_the_report(tmp_path, make_image):
    for i in range(3):
        make_image(tmp_path / f"id{i}" / "0.jpg")
    _, report = build_dataset({"kind": "folder", "root": str(tmp_path), "max_images": 14000}, source="r.yaml")
    assert "asked for max_images=14000 but only 3 images" in report.summary()
    with pytest.raises(EfquantError, match=r"r.yaml: data.max_images"):
        build_dataset({"kind": "folder", "root": str(tmp_path), "max_images": -5}, source="r.yaml")
