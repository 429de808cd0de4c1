"""The registry of data kinds (``data.kind`` in a recipe): it registers and lists, nothing else.

Every kind, built-in or from a plugin, is a :class:`DatasetKind` made by :func:`register_dataset_kind`
next to its dataset class (``folder``, ``list``, ``recordio``, ``random``, ``synthetic``). The
built-in names are known here without importing the data stage (so the recipe, a lower floor, can
validate ``kind``); their modules are imported, and so registered, the first time one is looked
up. :func:`efquant_fx.data.build.build_data` resolves a spec against this registry and builds it;
recipe validation accepts any registered name.

A factory is called as ``factory(spec, ctx)``: ``spec`` is the ``data:`` mapping (paths resolved) and
``ctx`` a :class:`BuildContext`; it returns a :class:`~efquant_fx.data.base.FaceDataset`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # only for annotations: this module imports nothing heavy
    from torch import nn

__all__ = [
    "DATASET_KINDS",
    "BuildContext",
    "DatasetFactory",
    "DatasetKind",
    "get_dataset_kind",
    "is_dataset_kind",
    "list_dataset_kinds",
    "register_dataset_kind",
    "unregister_dataset_kind",
]


@dataclass(frozen=True)
class BuildContext:
    """What a factory is told besides the spec.

    ``seed``: the data seed (the spec's ``seed``, else the caller's); ``run_seed``: the caller's seed;
    ``n``: images to make for generated kinds (the spec's ``n``, else the caller's default, else the
    kind's ``default_n``; may be None); ``limit``: at most this many images will be used (calibration),
    None for all; ``batch_shape``: (P identities, K images each) per training batch; ``teacher``: the
    float model, for kinds that need it; ``progress``: show a progress bar (None: on a terminal);
    ``prefix``: the recipe field of the spec, for error messages (``finetune.data``).
    """

    transform: Any  # efquant_fx.data.transforms.FaceTransform (this floor cannot name the data stage)
    seed: int
    train: bool = True
    run_seed: int = 0
    n: int | None = None
    limit: int | None = None
    batch_shape: tuple[int, int] = (1, 1)
    teacher: nn.Module | None = None
    progress: bool | None = None
    prefix: str = "data"


DatasetFactory = Callable[[dict[str, Any], BuildContext], Any]  # returns an efquant_fx.data.base.FaceDataset


@dataclass(frozen=True)
class DatasetKind:
    """A registered kind.

    ``keys``: the spec keys it takes besides the common ones (``path_keys`` of them are paths,
    resolved before the factory runs; ``required`` must be set); ``default_validate``: how read images
    are checked up front; ``generated``: images are made, not read (no key checks, subset selection or
    validation: the factory reads what it needs from the spec); ``needs_teacher``: building needs the
    float model; ``identities``: labels are identities with several images each (P x K batches, EKD
    positive pairs), not one label per image; ``default_n``: images a generated kind makes by default.
    """

    name: str
    factory: DatasetFactory
    keys: frozenset[str] = frozenset()
    path_keys: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()
    default_validate: Literal["decode", "header", "none"] = "decode"
    generated: bool = False
    needs_teacher: bool = False
    identities: bool = True
    default_n: int | None = None


DATASET_KINDS: dict[str, DatasetKind] = {}
_BUILTIN_MODULES = {  # registered on first lookup (or when efquant_fx.data is imported)
    "folder": "efquant_fx.data.folder",
    "list": "efquant_fx.data.listfile",
    "recordio": "efquant_fx.data.recordio",
    "random": "efquant_fx.data.random",
    "synthetic": "efquant_fx.data.synthetic",
}


def register_dataset_kind(
    name: str,
    *,
    keys: Iterable[str] = (),
    path_keys: Iterable[str] = (),
    required: Iterable[str] = (),
    default_validate: Literal["decode", "header", "none"] = "decode",
    generated: bool = False,
    needs_teacher: bool = False,
    identities: bool = True,
    default_n: int | None = None,
) -> Callable[[DatasetFactory], DatasetFactory]:
    """Decorator: make ``{kind: name, ...}`` buildable and valid in recipes (see :class:`DatasetKind`)."""

    def decorate(factory: DatasetFactory) -> DatasetFactory:
        if name in DATASET_KINDS:
            raise ValueError(f"dataset kind {name!r} is already registered")
        DATASET_KINDS[name] = DatasetKind(
            name, factory, frozenset(keys) | frozenset(path_keys) | frozenset(required), frozenset(path_keys),
            frozenset(required), default_validate, generated, needs_teacher, identities, default_n,
        )
        return factory

    return decorate


def unregister_dataset_kind(name: str) -> DatasetKind:
    """Remove a kind (plugins and tests); returns its entry. KeyError if it is not registered."""
    return DATASET_KINDS.pop(name)


def list_dataset_kinds() -> list[str]:
    """The registered kind names (built-ins included), sorted."""
    return sorted(set(DATASET_KINDS) | set(_BUILTIN_MODULES))


def is_dataset_kind(name: object) -> bool:
    return isinstance(name, str) and (name in DATASET_KINDS or name in _BUILTIN_MODULES)


def get_dataset_kind(name: str) -> DatasetKind:
    """The entry for ``name``; KeyError naming the known kinds if there is none."""
    if isinstance(name, str) and name not in DATASET_KINDS and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])  # registers itself
    try:
        return DATASET_KINDS[name]
    except (KeyError, TypeError):
        raise KeyError(f"unknown data kind {name!r}; known: {', '.join(list_dataset_kinds())}") from None
