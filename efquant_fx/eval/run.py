"""Running evaluators: the one place that calls ``evaluate()``, and the whole evaluate-and-report step.

:func:`run_evaluator` calls an evaluator the way its ``evaluate`` is written: ``progress`` is an
optional part of the contract (:class:`~efquant_fx.eval.base.Evaluator`), so it is passed only to
evaluators that accept it. :func:`evaluate_and_report` builds evaluators from recipe entries, runs
each on each model, and writes ``metrics.json`` and ``roc.png``.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from efquant_fx.eval.base import Evaluator
from efquant_fx.eval.cache import FeatureCache
from efquant_fx.eval.embed import model_hash
from efquant_fx.eval.plot import plot_roc
from efquant_fx.eval.registry import build_evaluators
from efquant_fx.eval.report import write_metrics_json
from efquant_fx.eval.result import EvalResult

log = logging.getLogger(__name__)


def accepts_progress(evaluator: Evaluator) -> bool:
    """Whether ``evaluator.evaluate`` takes a ``progress`` keyword (by name, or through ``**kwargs``)."""
    try:
        params = inspect.signature(evaluator.evaluate).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a C callable): keep to the required contract
        return False
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return any(
        (p.name == "progress" and p.kind in keyword) or p.kind is inspect.Parameter.VAR_KEYWORD for p in params
    )


def run_evaluator(
    evaluator: Evaluator,
    model: nn.Module,
    *,
    device: str | torch.device = "cpu",
    cache: FeatureCache | str | Path | None = None,
    progress: bool | None = None,
    batch_size: int | None = None,
) -> EvalResult:
    """``evaluator.evaluate(model, ...)`` with ``progress`` only if it accepts it.

    ``batch_size=None`` leaves the evaluator's own default.
    """
    kwargs: dict[str, Any] = {"device": device, "cache": cache}
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    if accepts_progress(evaluator):
        kwargs["progress"] = progress
    return evaluator.evaluate(model, **kwargs)


def evaluate_and_report(
    specs: Iterable[Mapping[str, Any]],
    models: Mapping[str, nn.Module],
    out: str | Path,
    *,
    device: str | torch.device = "cpu",
    source: str | None = None,
    progress: bool | None = None,
    recipe_hash: str | None = None,
    title: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, list[EvalResult]]:
    """Run every evaluator of ``specs`` (recipe ``eval:`` entries) on each of ``models`` (``{role: model}``).

    Embeddings are cached in ``out/feature_cache``; ``out/metrics.json`` gets every result with the
    model hashes, ``recipe_hash`` and ``extra``; ``out/roc.png`` plots every curve (when any result
    has one) under ``title``. ``source`` names the specs in errors (``--eval``, ``recipe eval``).
    Returns ``{role: [result per evaluator]}``.
    """
    out = Path(out)
    evaluators = build_evaluators(specs, source=source)
    cache = out / "feature_cache"
    results: dict[str, list[EvalResult]] = {role: [] for role in models}
    for ev in evaluators:
        for role, model in models.items():
            t0 = time.perf_counter()
            log.info("eval: %s on the %s", getattr(ev, "label", ev.name), role)
            results[role].append(run_evaluator(ev, model.eval(), device=device, cache=cache, progress=progress))
            log.info("eval: %s on the %s done in %.1f s", getattr(ev, "label", ev.name), role,
                     time.perf_counter() - t0)
    hashes = {role: model_hash(model) for role, model in models.items()}
    write_metrics_json(out / "metrics.json", results, recipe_hash=recipe_hash, model_hashes=hashes, extra=extra)
    curves = {f"{role} {r.name}": r for role in models for r in results[role] if r.curve is not None}
    if curves:
        plot_roc(out / "roc.png", curves, title=title)
    return results
