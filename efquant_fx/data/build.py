"""The builder: a recipe's ``data:`` mapping -> ``(dataset, DataReport)``, for every registered kind.

:func:`build_data` looks ``kind`` up in the registry (:mod:`efquant_fx.datakinds`; plugins add
kinds with :func:`register_dataset_kind`) and builds it. Kinds that read images (folder, list,
recordio): check the keys -> resolve paths -> list entries (the kind's factory) -> select the subset
(seeded) -> validate the selected images -> renumber labels; every step's counts and shortfalls end
up in the report. Generated kinds (random, synthetic) are made by their factory alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from efquant_fx.data.base import FaceDataset, validate_entries
from efquant_fx.data.report import DataReport
from efquant_fx.data.subset import select_subset
from efquant_fx.data.transforms import FaceTransform
from efquant_fx.datakinds import (
    DATASET_KINDS,
    BuildContext,
    DatasetKind,
    is_dataset_kind,
    list_dataset_kinds,
    register_dataset_kind,
)
from efquant_fx.errors import EfquantError

__all__ = ["COMMON_KEYS", "DATASET_KINDS", "build_data", "build_dataset", "register_dataset_kind"]

log = logging.getLogger(__name__)

COMMON_KEYS = frozenset(
    {"kind", "max_images", "max_identities", "min_images_per_identity", "seed", "validate", "flip"}
)
"""Keys every kind that reads images takes (subset selection, validation, augmentation)."""

Fail = Callable[[str, str], EfquantError]


def build_data(
    spec: Mapping[str, Any],
    *,
    train: bool = True,
    seed: int = 0,
    teacher: nn.Module | None = None,
    n_default: int | None = None,
    limit: int | None = None,
    batch_shape: tuple[int, int] = (1, 1),
    progress: bool | None = None,
    prefix: str = "data",
    source: str | None = None,
    base_dir: str | Path | None = None,
) -> tuple[FaceDataset, DataReport]:
    """Build the data described by ``spec`` (any registered kind) and report what was (not) loaded.

    ``spec``: ``kind``, the kind's keys (paths relative to ``base_dir``, default the current
    directory) and, for kinds that read images, optionally ``max_images``, ``max_identities``,
    ``min_images_per_identity``, ``seed``, ``validate`` (decode | header | none) and ``flip``
    (default true; only used when ``train``). ``seed``: the caller's seed, used when the spec has
    none, except that calibration (``train=False``) selects read images with seed 0 (a recipe keeps
    calibrating on the same images; the caller shuffles them). ``n_default``: images a generated
    kind makes when the spec has no ``n`` (else the kind's default); ``limit``: the most images the
    caller uses; ``batch_shape``: (P, K) of a training batch; ``teacher``: for kinds that need it.
    Errors name ``source`` (the recipe file) and ``<prefix>.<field>``.
    """

    def fail(message: str, key: str) -> EfquantError:
        return EfquantError(message, source=source, field=f"{prefix}.{key}")

    kind, spec = _resolve(spec, fail, source, prefix, base_dir)
    if kind.needs_teacher and teacher is None:
        raise fail(f"kind {kind.name!r} needs the teacher model to synthesize images from", "kind")
    data_seed = spec["seed"] if "seed" in spec else (seed if train or kind.generated else 0)
    if isinstance(data_seed, bool) or not isinstance(data_seed, int):
        raise fail(f"must be an integer, got {data_seed!r}", "seed")
    ctx = BuildContext(
        transform=FaceTransform(train=train and bool(spec.get("flip", True))), seed=data_seed, train=train,
        run_seed=seed, n=spec.get("n") or n_default or kind.default_n, limit=limit, batch_shape=batch_shape,
        teacher=teacher, progress=progress, prefix=prefix,
    )
    if kind.generated:
        dataset = kind.factory(spec, ctx)
        return dataset, dataset.report
    return _build_read(spec, kind, ctx, fail)


def build_dataset(
    spec: Mapping[str, Any],
    *,
    train: bool = True,
    source: str | None = None,
    base_dir: str | Path | None = None,
    prefix: str = "data",
) -> tuple[FaceDataset, DataReport]:
    """:func:`build_data` with the seed from the spec (default 0) and no teacher."""
    return build_data(spec, train=train, source=source, base_dir=base_dir, prefix=prefix)


def _resolve(spec: Mapping[str, Any], fail: Fail, source: str | None, prefix: str,
             base_dir: str | Path | None) -> tuple[DatasetKind, dict[str, Any]]:
    """The kind's entry and a copy of ``spec`` with its keys checked and its paths resolved."""
    if not isinstance(spec, Mapping):
        raise EfquantError(f"expected a mapping, got {type(spec).__name__}", source=source, field=prefix)
    spec = dict(spec)
    name = spec.get("kind")
    if not is_dataset_kind(name):
        raise fail(f"unknown kind {name!r}; known: {', '.join(list_dataset_kinds())}", "kind")
    kind = DATASET_KINDS[name]
    if not kind.generated:  # generated kinds read what they need and ignore the rest
        allowed = COMMON_KEYS | kind.keys
        for key in spec:
            if key not in allowed:
                raise fail(f"unknown key for kind {name!r}; allowed: {', '.join(sorted(allowed))}", key)
    for key in sorted(kind.required):
        if spec.get(key) in (None, ""):
            raise fail(f"required for kind {name!r}", key)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    for key in kind.path_keys:
        if spec.get(key) is not None:
            path = Path(str(spec[key])).expanduser()
            spec[key] = path if path.is_absolute() else base / path
    return kind, spec


def _build_read(spec: dict[str, Any], kind: DatasetKind, ctx: BuildContext,
                fail: Fail) -> tuple[FaceDataset, DataReport]:
    """List, select, validate: a kind that reads images."""
    validate = spec.get("validate", kind.default_validate)
    if validate not in ("decode", "header", "none"):
        raise fail(f"must be decode, header or none, got {validate!r}", "validate")
    try:
        dataset = kind.factory(spec, ctx)
        report = dataset.report
        subset = select_subset(
            dataset.labels,
            max_images=spec.get("max_images"),
            max_identities=spec.get("max_identities"),
            min_images_per_identity=spec.get("min_images_per_identity", 1),
            seed=ctx.seed,
        )
    except EfquantError as exc:
        if exc.source is None and exc.field is not None:  # a bare field error: point at the recipe
            raise fail(str(exc).removeprefix(f"{exc.field}: "), exc.field) from None
        named = [key for key in sorted(kind.path_keys) if spec.get(key) is not None and exc.source == str(spec[key])]
        if named:  # about a path the spec names (e.g. not found): the resolved path, then its recipe field
            message = str(exc).removeprefix(f"{exc.source}: ").removeprefix(f"{exc.field}: " if exc.field else "")
            raise EfquantError(message, source=exc.source, field=f"{ctx.prefix}.{named[0]}") from None
        raise
    report.notes.extend(subset.notes)
    dataset.keep(subset.indices)
    report.selected = len(dataset)

    good = validate_entries(dataset.keys, dataset.read_bytes, dataset.describe, validate, report)
    if len(good) < len(dataset):  # named here too: on a terminal only the notes (warnings) are shown
        bad = len(dataset) - len(good)
        more = f" (+{bad - len(report.unreadable_paths)} more)" if bad > len(report.unreadable_paths) else ""
        report.notes.append(
            f"{bad} of {report.selected} selected images are unreadable and were dropped: "
            f"{'; '.join(report.unreadable_paths)}{more}; {'fine-tuning' if ctx.train else 'calibration'} "
            f"uses {len(good)}"
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
