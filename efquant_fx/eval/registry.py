"""Evaluators by name: built-ins, in-process registrations, and plugins from installed packages.

A plugin package exposes a class (or factory) in the entry-point group ``efquant_fx.evaluators``::

    [project.entry-points."efquant_fx.evaluators"]
    megaface = "my_pkg.megaface:MegaFaceEvaluator"

It is then usable from recipes as ``{name: megaface, ...options}``. The factory is called with
the recipe options as keyword arguments and must return an object with ``name``, ``label`` and
``evaluate(model, *, device, batch_size, cache) -> EvalResult`` (:class:`~efquant_fx.eval.base.Evaluator`).
``evaluate`` may also accept ``progress: bool | None`` (show a progress bar); it is passed only to
evaluators that accept it (:func:`~efquant_fx.eval.run.run_evaluator`). Evaluators that embed one
image set and score the embeddings can subclass :class:`~efquant_fx.eval.base.EmbeddingEvaluator`
and write only ``load()`` and ``score()``. Built-in names win over plugins of the same name.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from efquant_fx.errors import EfquantError
from efquant_fx.eval.base import Evaluator

ENTRY_POINT_GROUP = "efquant_fx.evaluators"

EvaluatorFactory = Callable[..., Evaluator]

_BUILTINS: dict[str, str] = {
    "lfw_bin": "efquant_fx.eval.verification:BinVerification",
    "pairs": "efquant_fx.eval.verification:PairsVerification",
    "dense": "efquant_fx.eval.dense:DenseVerification",
    "ijb": "efquant_fx.eval.ijb:IJBVerification",
    "identification": "efquant_fx.eval.identification:Identification",
}
_REGISTERED: dict[str, EvaluatorFactory] = {}
_WARNED: set[str] = set()


def register_evaluator(name: str) -> Callable[[EvaluatorFactory], EvaluatorFactory]:
    """Decorator registering a factory in this process (packages should prefer entry points)."""

    def decorate(factory: EvaluatorFactory) -> EvaluatorFactory:
        if name in _BUILTINS or name in _REGISTERED:
            raise ValueError(f"evaluator {name!r} is already registered")
        _REGISTERED[name] = factory
        return factory

    return decorate


def _plugins() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _BUILTINS or ep.name in _REGISTERED:
            if _BUILTINS.get(ep.name) == ep.value.replace(" ", ""):
                continue  # our own package advertising its built-ins
            if ep.value not in _WARNED:
                _WARNED.add(ep.value)
                msg = f"plugin evaluator {ep.name!r} ({ep.value}) is shadowed by a built-in"
                warnings.warn(msg, stacklevel=3)
            continue
        found.setdefault(ep.name, ep)
    return found


def list_evaluators() -> list[str]:
    """Names accepted by :func:`get_evaluator`, sorted: built-ins, registrations, installed plugins."""
    return sorted({*_BUILTINS, *_REGISTERED, *_plugins()})


def _resolve(name: str) -> EvaluatorFactory:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTINS:
        module, attr = _BUILTINS[name].split(":")
        return getattr(importlib.import_module(module), attr)
    plugins = _plugins()
    if name not in plugins:
        raise EfquantError(f"unknown evaluator {name!r}; known: {', '.join(list_evaluators())}", field="name")
    ep = plugins[name]
    try:
        return ep.load()
    except Exception as exc:  # a broken third-party package must not crash with a trace
        dist = getattr(ep, "dist", None)
        where = f" from {dist.name}" if dist is not None else ""
        raise EfquantError(
            f"cannot load plugin evaluator {name!r} ({ep.value}){where}: {type(exc).__name__}: {exc}",
            field="name",
        ) from None


def get_evaluator(name: str, **options: Any) -> Evaluator:
    """Build evaluator ``name`` with ``options`` (the recipe entry minus ``name``).

    Unknown names and options are reported as :class:`EfquantError` naming the offending field.
    """
    factory = _resolve(name)
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        raise EfquantError(f"evaluator {name!r}: {exc}", field=name) from None
    except ValueError:  # no signature available (builtins/C callables): let the call decide
        pass
    try:
        evaluator = factory(**options)
    except (TypeError, ValueError) as exc:  # e.g. a string where a number belongs
        raise EfquantError(f"evaluator {name!r}: bad option value ({exc})", field=name) from None
    if not callable(getattr(evaluator, "evaluate", None)):
        raise EfquantError(
            f"evaluator {name!r} returned {type(evaluator).__name__}, which has no evaluate()", field="name"
        )
    if not getattr(evaluator, "label", None):
        try:
            evaluator.label = options.get("label") or name  # type: ignore[misc]
        except AttributeError:
            pass
    return evaluator


def build_evaluators(specs: Iterable[Mapping[str, Any]], *, source: str | None = None) -> list[Evaluator]:
    """Evaluators from recipe entries like ``[{name: lfw_bin, path: ...}, {name: pairs, ...}]``.

    Errors name the entry (``evaluators[1]``) so the recipe line is easy to find.
    """
    out: list[Evaluator] = []
    for i, spec in enumerate(specs):
        field = f"evaluators[{i}]"
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise EfquantError("each evaluator entry needs a 'name'", source=source, field=field)
        options = {k: v for k, v in spec.items() if k != "name"}
        try:
            out.append(get_evaluator(spec["name"], **options))
        except EfquantError as exc:
            raise EfquantError(str(exc), source=source, field=field) from None
    labels = [getattr(e, "label", "") for e in out]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise EfquantError(
            f"several evaluators are labelled {dupes}; give each a distinct 'label'",
            source=source,
            field="evaluators",
        )
    return out
