"""Pick the small fine-tuning subset (Ef-QuantFace uses <= 14,000 images), the same way for a seed.

Identities are shuffled with the seed and taken whole, in that order, until ``max_images`` is
reached (the last one may be cut, but never below ``min_images_per_identity``). Taking identities
whole keeps several images per identity, which the identity-balanced sampler and the EKD positive
pairs need. Every shortfall (fewer images or identities than asked) is written to ``notes``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from efquant_fx.errors import EfquantError


@dataclass
class Subset:
    """Chosen positions (sorted, into the listed entries) and what the user should be told."""

    indices: list[int]
    identities: int
    notes: list[str] = field(default_factory=list)


def _check_limit(value: int | None, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EfquantError(f"must be a positive integer or null, got {value!r}", field=name)
    return value


def select_subset(
    labels: Sequence[int],
    *,
    max_images: int | None = None,
    max_identities: int | None = None,
    min_images_per_identity: int = 1,
    seed: int = 0,
) -> Subset:
    """Deterministic subset of ``labels``' positions for ``seed`` (see the module docstring)."""
    max_images = _check_limit(max_images, "max_images")
    max_identities = _check_limit(max_identities, "max_identities")
    min_per = _check_limit(min_images_per_identity, "min_images_per_identity") or 1
    notes: list[str] = []

    groups: dict[int, list[int]] = {}
    for pos, label in enumerate(labels):
        groups.setdefault(int(label), []).append(pos)
    eligible = sorted(label for label, members in groups.items() if len(members) >= min_per)
    if min_per > 1:
        dropped = len(groups) - len(eligible)
        if dropped:
            dropped_images = sum(len(groups[lab]) for lab in groups if len(groups[lab]) < min_per)
            notes.append(
                f"min_images_per_identity={min_per} drops {dropped} of {len(groups)} identities "
                f"({dropped_images} images)"
            )
    available_images = sum(len(groups[lab]) for lab in eligible)

    rng = random.Random(seed)
    order = list(eligible)
    rng.shuffle(order)
    if max_identities is not None:
        if max_identities > len(order):
            notes.append(
                f"asked for max_identities={max_identities} but only {len(order)} identities are available; "
                f"using all {len(order)}"
            )
        order = order[:max_identities]
    pool_images = sum(len(groups[lab]) for lab in order)
    if max_images is not None and max_images > pool_images:
        where = "in the chosen identities" if max_identities is not None else "available"
        notes.append(
            f"asked for max_images={max_images} but only {pool_images} images are {where} "
            f"(of {available_images} after filtering); using all {pool_images}"
        )

    budget = max_images if max_images is not None else pool_images
    chosen: list[int] = []
    used = 0
    for label in order:
        if budget <= 0:
            break
        members = list(groups[label])
        take = min(len(members), budget)
        if take < min_per:
            continue  # too few left for this identity; a smaller one later may still fit
        if take < len(members):
            rng.shuffle(members)
        chosen.extend(members[:take])
        budget -= take
        used += 1
    if max_images is not None and budget > 0 and pool_images >= max_images:
        notes.append(
            f"selected {len(chosen)} of max_images={max_images}: no remaining identity fits the last "
            f"{budget} slots with min_images_per_identity={min_per}"
        )
    if not chosen:
        raise EfquantError(
            "no images left after subset selection (check min_images_per_identity / max_* limits)",
            field="min_images_per_identity",
        )
    return Subset(indices=sorted(chosen), identities=used, notes=notes)
