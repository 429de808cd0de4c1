"""Verification benchmarks as plugins, with reports people can read.

Evaluators are built by name (:func:`get_evaluator`, recipes' ``evaluators:`` list) and run on any
number of models; embeddings are cached per (model hash, data fingerprint, flip) so teacher and
student share decoded images. Built-ins: ``lfw_bin`` (insightface ``.bin`` packs), ``pairs`` (image
folder + pairs list), ``dense`` (all-vs-all TAR@FAR), ``ijb`` (IJB-B/C 1:1), ``identification`` (1:N).
"""

from efquant_fx.eval.base import EmbeddingEvaluator, Evaluator
from efquant_fx.eval.cache import FeatureCache
from efquant_fx.eval.embed import extract_embeddings, model_hash
from efquant_fx.eval.plot import plot_roc
from efquant_fx.eval.registry import (
    ENTRY_POINT_GROUP,
    build_evaluators,
    get_evaluator,
    list_evaluators,
    register_evaluator,
)
from efquant_fx.eval.report import compare_table, flatten_metrics, write_metrics_json
from efquant_fx.eval.result import Curve, EvalResult, far_key
from efquant_fx.eval.run import evaluate_and_report, run_evaluator

__all__ = [
    "ENTRY_POINT_GROUP",
    "Curve",
    "EmbeddingEvaluator",
    "EvalResult",
    "Evaluator",
    "FeatureCache",
    "build_evaluators",
    "compare_table",
    "evaluate_and_report",
    "extract_embeddings",
    "far_key",
    "flatten_metrics",
    "get_evaluator",
    "list_evaluators",
    "model_hash",
    "plot_roc",
    "register_evaluator",
    "run_evaluator",
    "write_metrics_json",
]
