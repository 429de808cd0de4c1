"""Identity-balanced batches (P identities x K images), so every batch has positive pairs for EKD.

One global sequence of batches is drawn per epoch from ``(seed, epoch)``, identically on every rank;
rank ``r`` of ``world_size`` takes batches ``r, r + W, r + 2W, ...``, so ranks get different batches
and the same number of them. Identities are visited in a shuffled cycle (no identity twice in a
batch, every identity once before any repeats), and each identity's images in a shuffled cycle;
an identity with fewer than K images contributes all of them plus draws with replacement.
Samples repeat across ranks only once the epoch has cycled through all identities.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from efquant_fx.errors import EfquantError


class IdentityBalancedBatchSampler(Sampler[list[int]]):
    """Yields lists of P*K dataset indices (identity-major: K of the first identity, then the next...).

    ``num_batches`` is the global number of batches per epoch (default: ``len(labels) // (P*K)``, at
    least ``world_size``); each rank yields ``num_batches // world_size``. Pass it to a DataLoader as
    ``batch_sampler=`` and call :meth:`set_epoch` every epoch.
    """

    def __init__(
        self,
        labels: Sequence[int],
        identities_per_batch: int,
        images_per_identity: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_batches: int | None = None,
    ):
        p, k = int(identities_per_batch), int(images_per_identity)
        if p < 1 or k < 1:
            raise EfquantError(f"P and K must be >= 1, got P={p}, K={k}", field="identities_per_batch")
        if world_size < 1 or not 0 <= rank < world_size:
            raise EfquantError(f"rank {rank} is not in [0, {world_size})", field="rank")
        groups: dict[int, list[int]] = {}
        for index, label in enumerate(labels):
            groups.setdefault(int(label), []).append(index)
        if len(groups) < p:
            raise EfquantError(
                f"a batch needs {p} distinct identities but the data has {len(groups)}",
                field="identities_per_batch",
            )
        self.identities = sorted(groups)
        self.members = [np.asarray(groups[label], dtype=np.int64) for label in self.identities]
        self.p, self.k = p, k
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        total = num_batches if num_batches is not None else len(labels) // (p * k)
        self.num_batches = max(int(total), world_size)
        self.epoch = 0

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's draw (same on all ranks)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches // self.world_size

    def _global_batches(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        id_cycle: deque[int] = deque()
        img_cycles: dict[int, deque[int]] = {}
        for _ in range(len(self) * self.world_size):
            chosen: list[int] = []
            while len(chosen) < self.p:
                if not id_cycle:
                    # refill; identities already in this batch go last so none is drawn twice
                    perm = rng.permutation(len(self.members)).tolist()
                    id_cycle.extend([i for i in perm if i not in chosen] + [i for i in perm if i in chosen])
                chosen.append(id_cycle.popleft())
            batch: list[int] = []
            for ident in chosen:
                batch.extend(self._take(ident, rng, img_cycles))
            yield batch

    def _take(self, ident: int, rng: np.random.Generator, cycles: dict[int, deque[int]]) -> list[int]:
        """K images of one identity: distinct when it has >= K, else all of them plus repeats."""
        members = self.members[ident]
        if len(members) < self.k:
            extra = rng.choice(members, size=self.k - len(members), replace=True)
            return rng.permutation(members).tolist() + extra.tolist()
        out: list[int] = []
        cycle = cycles.setdefault(ident, deque())
        while len(out) < self.k:
            if not cycle:
                perm = rng.permutation(members).tolist()
                cycle.extend([i for i in perm if i not in out] + [i for i in perm if i in out])
            out.append(cycle.popleft())
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for position, batch in enumerate(self._global_batches()):
            if position % self.world_size == self.rank:
                yield batch
