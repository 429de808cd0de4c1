"""The dataset all kinds share: a list of (key, label) entries, a loader for a key, and the transform.

Bad images are handled in two places (documented choice):

1. At construction, :func:`validate_entries` decodes every *selected* entry (the selection is at most
   a few tens of thousands of small JPEGs, so this is cheap next to fine-tuning) and drops the ones
   that fail, counting them in the :class:`DataReport`. ``validate="header"`` only opens headers (faster,
   misses truncated data) and ``validate="none"`` skips the scan.
2. At read time, a sample that still fails (file changed, or not scanned) is replaced by the next
   readable sample of the same identity (else the next readable sample), deterministically, and
   counted in ``report.substituted``; the run never crashes on one bad image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Literal

import torch
from PIL import Image
from torch.utils.data import Dataset

from efquant_fx.data.report import DataReport
from efquant_fx.data.transforms import FaceTransform, UnreadableImage, check_image_header, decode_image
from efquant_fx.errors import EfquantError

log = logging.getLogger(__name__)

Validate = Literal["decode", "header", "none"]
MAX_SUBSTITUTES = 16


def validate_entries(
    keys: Sequence[Hashable],
    read_bytes: Callable[[Hashable], bytes | str],
    describe: Callable[[Hashable], str],
    mode: Validate,
    report: DataReport,
) -> list[int]:
    """Positions of ``keys`` that decode (or pass the header check); failures go into ``report``."""
    if mode not in ("decode", "header", "none"):
        raise EfquantError(f"validate must be decode, header or none, got {mode!r}", field="validate")
    if mode == "none":
        return list(range(len(keys)))
    check = decode_image if mode == "decode" else check_image_header
    good = []
    for pos, key in enumerate(keys):
        try:
            check(read_bytes(key))
        except UnreadableImage as exc:
            report.add_unreadable(describe(key), str(exc))
            continue
        good.append(pos)
    return good


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One 63-bit seed per (seed, epoch, index): augmentation does not depend on worker layout."""
    value = (int(seed) * 1_000_003 + int(epoch)) * 1_000_000_007 + int(index)
    return value % (2**63 - 1)


class FaceDataset(Dataset):
    """Returns ``(image [3,112,112] float in [-1,1], label int)``; labels are 0..num_classes-1.

    Subclasses implement :meth:`read_bytes` (encoded image or path for a key) and :meth:`describe`
    (a path-like name for messages). Labels given at construction are the original identities
    (folder index, list or record label); they are renumbered to 0..n-1 in sorted order, and
    ``label_names[c]`` is the original identity name of class ``c`` (also after :meth:`keep`).
    """

    def __init__(
        self,
        keys: Sequence[Hashable],
        labels: Sequence[int],
        report: DataReport,
        *,
        names: Mapping[int, str] | None = None,
        transform: FaceTransform | None = None,
        seed: int = 0,
    ):
        if len(keys) != len(labels):
            raise ValueError("keys and labels differ in length")
        self.keys = list(keys)
        self.original_labels = [int(x) for x in labels]
        self._names = dict(names) if names is not None else {}
        self.report = report
        self.transform = transform or FaceTransform(train=False)
        self.seed = int(seed)
        self.epoch = 0
        self._renumber()

    def _renumber(self) -> None:
        classes = sorted(set(self.original_labels))
        index = {raw: c for c, raw in enumerate(classes)}
        self.labels = [index[raw] for raw in self.original_labels]
        self.label_names = [self._names.get(raw, str(raw)) for raw in classes]
        self._by_label: dict[int, list[int]] | None = None

    def keep(self, positions: Sequence[int]) -> None:
        """Restrict to ``positions`` (in order) and renumber the labels."""
        self.keys = [self.keys[i] for i in positions]
        self.original_labels = [self.original_labels[i] for i in positions]
        self._renumber()

    # ---- to implement
    def read_bytes(self, key: Hashable) -> bytes | str:
        """Encoded image bytes, or a filesystem path, for ``key``."""
        raise NotImplementedError

    def describe(self, key: Hashable) -> str:
        return str(key)

    # ---- shared behaviour
    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draw (call with the sampler's ``set_epoch``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.keys)

    def load_image(self, index: int) -> Image.Image:
        return decode_image(self.read_bytes(self.keys[index]))

    def _substitutes(self, index: int) -> list[int]:
        if self._by_label is None:
            by_label: dict[int, list[int]] = {}
            for i, label in enumerate(self.labels):
                by_label.setdefault(label, []).append(i)
            self._by_label = by_label
        same = self._by_label[self.labels[index]]
        start = same.index(index)
        order = same[start + 1 :] + same[:start]  # same identity first, keeps P x K batches intact
        for k in range(1, len(self)):
            if len(order) >= MAX_SUBSTITUTES:
                break
            other = (index + k) % len(self)
            if other not in order:
                order.append(other)
        return order[:MAX_SUBSTITUTES]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            img = self.load_image(index)
            chosen = index
        except UnreadableImage as exc:
            img, chosen = self._load_substitute(index, exc)
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
        return self.transform(img, generator), self.labels[chosen]

    def _load_substitute(self, index: int, exc: UnreadableImage) -> tuple[Image.Image, int]:
        self.report.substituted += 1
        log.warning(
            "unreadable image %s (%s); substituting another sample", self.describe(self.keys[index]), exc
        )
        for other in self._substitutes(index):
            try:
                return self.load_image(other), other
            except UnreadableImage:
                self.report.substituted += 1
        raise EfquantError(
            f"{MAX_SUBSTITUTES + 1} images in a row are unreadable near index {index}; check the data",
            source=self.report.source,
        )


class InMemoryFaceDataset(FaceDataset):
    """Images made, not read (random, synthetic): held in ``images`` ``[N,3,112,112]``, one label each."""

    def __init__(self, images: torch.Tensor, report: DataReport, *, seed: int = 0):
        n = int(images.shape[0])
        super().__init__(list(range(n)), list(range(n)), report, seed=seed)
        self.images = images

    def read_bytes(self, key: Hashable) -> bytes:  # pragma: no cover - held in memory
        raise NotImplementedError(f"{self.report.kind} images are held in memory, not read")

    def keep(self, positions: Sequence[int]) -> None:
        positions = list(positions)
        self.images = self.images[positions]
        super().keep(positions)
        self.keys = list(range(len(positions)))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.labels[index]

