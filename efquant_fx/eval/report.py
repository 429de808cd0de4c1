"""Reports people can read: a metrics JSON with provenance, and a teacher-vs-compressed table.

Results can be given as ``{model: [EvalResult, ...]}``, ``{model: {label: EvalResult}}``, a plain list of
results (one model), or already-flat ``{metric: value}`` dicts; :func:`flatten_metrics` turns any of
these into ``{"<benchmark>/<metric>": value}``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from efquant_fx.eval.result import EvalResult
from efquant_fx.files import atomic_write_text

ResultsLike = EvalResult | Sequence[EvalResult] | Mapping[str, Any]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every metrics file."""
    import torch

    return {
        "efquant_fx": _version("efquant-fx"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scikit-learn": _version("scikit-learn"),
        "brevitas": _version("brevitas"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, EvalResult):
        return _result_dict(value)
    return value


def _result_dict(r: EvalResult) -> dict[str, Any]:
    return {"protocol": r.protocol, "metrics": _jsonable(r.metrics), "info": _jsonable(r.info)}


def _per_benchmark(results: ResultsLike) -> dict[str, Any]:
    """One model's results as ``{label: {"protocol", "metrics", "info"}}``."""
    if isinstance(results, EvalResult):
        return {results.name: _result_dict(results)}
    if isinstance(results, Mapping):
        return {
            str(k): (_result_dict(v) if isinstance(v, EvalResult) else _jsonable(v))
            for k, v in results.items()
        }
    return {r.name: _result_dict(r) for r in results}


def write_metrics_json(
    path: str | Path,
    results: Mapping[str, ResultsLike] | Sequence[EvalResult],
    *,
    recipe_hash: str | None = None,
    model_hashes: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write every number with versions and hashes; atomic (temp file + ``os.replace``).

    ``results`` maps a model name (``teacher``, ``w4a8``...) to its results; a bare list is
    stored under ``"model"``. Non-finite numbers become ``null`` so the file is strict JSON.
    """
    path = Path(path)
    per_model = {"model": results} if not isinstance(results, Mapping) else results
    doc = {
        "schema": "efquant_fx.metrics/1",
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe_hash": recipe_hash,
        "model_hashes": dict(model_hashes or {}),
        "environment": environment(),
        "results": {str(name): _per_benchmark(res) for name, res in per_model.items()},
        "extra": _jsonable(dict(extra or {})),
    }
    text = json.dumps(_jsonable(doc), indent=2, allow_nan=False, sort_keys=False) + "\n"
    atomic_write_text(path, text)
    return path


def flatten_metrics(results: ResultsLike) -> dict[str, float]:
    """``{"<benchmark>/<metric>": value}`` from any accepted result shape (flat dicts pass through)."""
    if isinstance(results, EvalResult):
        return {f"{results.name}/{k}": v for k, v in results.metrics.items()}
    if isinstance(results, Mapping):
        flat: dict[str, float] = {}
        for key, value in results.items():
            if isinstance(value, EvalResult):
                flat.update({f"{key}/{k}": v for k, v in value.metrics.items()})
            elif isinstance(value, Mapping):
                metrics = value.get("metrics", value) if isinstance(value.get("metrics"), Mapping) else value
                flat.update({f"{key}/{k}": float(v) for k, v in metrics.items() if _is_number(v)})
            elif _is_number(value):
                flat[str(key)] = float(value)
        return flat
    flat = {}
    for r in results:
        flat.update(flatten_metrics(r))
    return flat


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


_HIGHER_IS_BETTER = ("acc", "tar@", "auc", "rank")


def _is_rate(metric: str) -> bool:
    leaf = metric.rsplit("/", 1)[-1]
    return leaf.startswith(_HIGHER_IS_BETTER) or leaf == "acc_std"


def _fmt(metric: str, v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    return f"{100 * v:.2f}%" if _is_rate(metric) else f"{v:.4g}"


def _fmt_delta(metric: str, d: float) -> str:
    leaf = metric.rsplit("/", 1)[-1]
    text = f"{100 * d:+.2f} pp" if _is_rate(metric) else f"{d:+.4g}"
    if leaf.startswith(_HIGHER_IS_BETTER) and abs(d) > 1e-12:
        return f"[green]{text}[/]" if d > 0 else f"[red]{text}[/]"
    return text


def compare_table(
    teacher: ResultsLike,
    *students: ResultsLike,
    names: Sequence[str] | None = None,
    title: str | None = "Teacher vs compressed",
) -> Table:
    """A rich table: one row per metric, the teacher, then each student with its delta to the teacher.

    Rates (accuracy, TAR, AUC, rank-k) are shown in percent with deltas in percentage points,
    gains green and losses red. ``names`` labels the columns (default ``teacher``, ``student``/``student N``).
    """
    labels = (
        list(names)
        if names is not None
        else (
            ["teacher", "student"]
            if len(students) == 1
            else ["teacher", *[f"student {i + 1}" for i in range(len(students))]]
        )
    )
    if len(labels) != 1 + len(students):
        raise ValueError(f"{len(labels)} names for {1 + len(students)} models")
    base = flatten_metrics(teacher)
    others = [flatten_metrics(s) for s in students]
    table = Table(title=title)
    table.add_column("benchmark")
    table.add_column("metric")
    table.add_column(labels[0], justify="right")
    for lab in labels[1:]:
        table.add_column(lab, justify="right")
        table.add_column("Δ", justify="right")
    keys = list(base) + [k for o in others for k in o if k not in base]
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            continue
        seen.add(key)
        bench, _, metric = key.rpartition("/")
        t = base.get(key)
        row = [bench, metric, _fmt(key, t)]
        for o in others:
            s = o.get(key)
            row.append(_fmt(key, s))
            row.append(_fmt_delta(key, s - t) if s is not None and t is not None else "—")
        table.add_row(*row)
    return table
