"""``build_dataset(spec)``: one entry point from a recipe's ``data:`` mapping to (dataset, report).

Steps: list entries (kind-specific) -> select the subset (seeded) -> validate the selected images
-> renumber labels. Every step's counts and shortfalls end up in the returned :class:`DataReport`.

New kinds (e.g. ``synthetic``) plug in with :func:`register_dataset_kind`; the factory receives
the spec (paths already resolved), the transform and the seed, and returns a :class:`FaceDataset`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from efquant_fx.data.base import FaceDataset, Validate, validate_entries
from efquant_fx.data.folder import ImageFolderDataset
from efquant_fx.data.listfile import ListFileDataset
from efquant_fx.data.recordio import RecordIODataset
from efquant_fx.data.report import DataReport
from efquant_fx.data.subset import select_subset
from efquant_fx.data.transforms import FaceTransform
from efquant_fx.errors import EfquantError

log = logging.getLogger(__name__)

DatasetFactory = Callable[[dict[str, Any], FaceTransform, int], FaceDataset]

COMMON_KEYS = frozenset(
    {"kind", "max_images", "max_identities", "min_images_per_identity", "seed", "validate", "flip"}
)


@dataclass(frozen=True)
class DatasetKind:
    """A registered kind: its factory, the extra spec keys it accepts, which of them are paths."""

    factory: DatasetFactory
    keys: frozenset[str]
    path_keys: frozenset[str]
    required: frozenset[str]
    default_validate: Validate = "decode"


DATASET_KINDS: dict[str, DatasetKind] = {}


def register_dataset_kind(
    name: str,
    *,
    keys: Iterable[str] = (),
    path_keys: Iterable[str] = (),
    required: Iterable[str] = (),
    default_validate: Validate = "decode",
) -> Callable[[DatasetFactory], DatasetFactory]:
    """Decorator: make ``{kind: name, ...}`` buildable. ``default_validate="none"`` suits generated data."""

    def decorate(factory: DatasetFactory) -> DatasetFactory:
        if name in DATASET_KINDS:
            raise ValueError(f"dataset kind {name!r} is already registered")
        DATASET_KINDS[name] = DatasetKind(
            factory, frozenset(keys), frozenset(path_keys), frozenset(required), default_validate
        )
        return factory

    return decorate


@register_dataset_kind("folder", keys=("root",), path_keys=("root",), required=("root",))
def _folder(spec: dict[str, Any], transform: FaceTransform, seed: int) -> FaceDataset:
    return ImageFolderDataset(spec["root"], transform=transform, seed=seed)


@register_dataset_kind("list", keys=("root", "list"), path_keys=("root", "list"), required=("list",))
def _listfile(spec: dict[str, Any], transform: FaceTransform, seed: int) -> FaceDataset:
    return ListFileDataset(spec["list"], spec.get("root"), transform=transform, seed=seed)


@register_dataset_kind("recordio", keys=("root", "idx"), path_keys=("root", "idx"), required=("root",))
def _recordio(spec: dict[str, Any], transform: FaceTransform, seed: int) -> FaceDataset:
    return RecordIODataset(spec["root"], spec.get("idx"), transform=transform, seed=seed)


def build_dataset(
    spec: Mapping[str, Any],
    *,
    train: bool = True,
    source: str | None = None,
    base_dir: str | Path | None = None,
    prefix: str = "data",
) -> tuple[FaceDataset, DataReport]:
    """Build the fine-tuning dataset described by ``spec`` and report what was (not) loaded.

    ``spec``: ``kind`` (folder | list | recordio | any registered kind), the kind's paths
    (``root``, ``list``, ``idx``; relative ones resolve against ``base_dir``), and optionally
    ``max_images``, ``max_identities``, ``min_images_per_identity``, ``seed`` (default 0),
    ``validate`` (decode | header | none) and ``flip`` (default true; only used when ``train``).
    Errors name ``source`` (the recipe file) and ``<prefix>.<field>``.
    """

    def fail(message: str, key: str) -> EfquantError:
        return EfquantError(message, source=source, field=f"{prefix}.{key}")

    if not isinstance(spec, Mapping):
        raise EfquantError(f"expected a mapping, got {type(spec).__name__}", source=source, field=prefix)
    spec = dict(spec)
    kind_name = spec.get("kind")
    if kind_name not in DATASET_KINDS:
        raise fail(f"unknown kind {kind_name!r}; known: {', '.join(sorted(DATASET_KINDS))}", "kind")
    kind = DATASET_KINDS[kind_name]
    for key in spec:
        if key not in COMMON_KEYS | kind.keys:
            raise fail(
                f"unknown key for kind {kind_name!r}; allowed: {', '.join(sorted(COMMON_KEYS | kind.keys))}",
                key,
            )
    for key in sorted(kind.required):
        if spec.get(key) in (None, ""):
            raise fail(f"required for kind {kind_name!r}", key)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    for key in kind.path_keys:
        if spec.get(key) is not None:
            path = Path(str(spec[key])).expanduser()
            spec[key] = path if path.is_absolute() else base / path
    seed = spec.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise fail(f"must be an integer, got {seed!r}", "seed")
    validate = spec.get("validate", kind.default_validate)
    if validate not in ("decode", "header", "none"):
        raise fail(f"must be decode, header or none, got {validate!r}", "validate")

    transform = FaceTransform(train=train and bool(spec.get("flip", True)))
    try:
        dataset = kind.factory(spec, transform, seed)
        report = dataset.report
        subset = select_subset(
            dataset.labels,
            max_images=spec.get("max_images"),
            max_identities=spec.get("max_identities"),
            min_images_per_identity=spec.get("min_images_per_identity", 1),
            seed=seed,
        )
    except EfquantError as exc:
        if exc.source is None and exc.field is not None:  # a bare field error: point at the recipe
            raise fail(str(exc).removeprefix(f"{exc.field}: "), exc.field) from None
        named = [key for key in sorted(kind.path_keys) if spec.get(key) is not None and exc.source == str(spec[key])]
        if named:  # about a path the spec names (e.g. not found): the resolved path, then its recipe field
            message = str(exc).removeprefix(f"{exc.source}: ").removeprefix(f"{exc.field}: " if exc.field else "")
            raise EfquantError(message, source=exc.source, field=f"{prefix}.{named[0]}") from None
        raise
    report.notes.extend(subset.notes)
    dataset.keep(subset.indices)
    report.selected = len(dataset)

    good = validate_entries(dataset.keys, dataset.read_bytes, dataset.describe, validate, report)
    if len(good) < len(dataset):
        report.notes.append(
            f"{len(dataset) - len(good)} of {report.selected} selected images are unreadable and were "
            f"dropped; fine-tuning uses {len(good)}"
        )
        dataset.keep(good)
    report.loaded = len(dataset)
    report.identities = dataset.num_classes
    if not len(dataset):
        raise EfquantError("no readable images in the selection", source=report.source)
    log.info("%s", report.summary())
    for note in report.notes:
        log.warning("%s: %s", report.source, note)
    return dataset, report
