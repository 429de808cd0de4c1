"""The names of the files in a run directory, in one place for the writers and the readers.

``efquant-fx apply`` (and :meth:`CompressionResult.save`) writes them; :func:`efquant_fx.load_result`,
``efquant-fx eval`` and ``efquant-fx export`` read them back.
"""

from __future__ import annotations

RECIPE_FILE = "recipe.yaml"  # the resolved recipe, written first: a failed run still says what was asked
REPORT_FILE = "compression.json"  # the per-layer report, fidelity, timings, notes
STATE_FILE = "model.pt"  # the compressed state dict
METRICS_FILE = "metrics.json"  # teacher vs student, per evaluator
ROC_FILE = "roc.png"
EXPORT_DIR = "export"
EVAL_DIR = "eval"  # where ``efquant-fx eval RUN`` writes by default
LAST_CHECKPOINT = "last.pt"  # the fine-tune checkpoint ``--resume`` continues from
BEST_CHECKPOINT = "best.pt"
FEATURE_CACHE = "feature_cache"  # embeddings cached by the evaluators

# everything a run writes: what ``efquant-fx apply --overwrite`` clears (and nothing else)
RUN_FILES = (RECIPE_FILE, REPORT_FILE, STATE_FILE, METRICS_FILE, ROC_FILE, LAST_CHECKPOINT, BEST_CHECKPOINT)
RUN_FOLDERS = (EXPORT_DIR, EVAL_DIR, FEATURE_CACHE)
