"""Evaluate one face model on the real LFW-112 dev split: 3-fold pair accuracy + dense TAR@FAR.

Data: ``$EFQUANT_SHARED/data/lfw112/`` (default ``<repo>/../shared``), see its README:

* ``dev_pairs.bin`` — insightface pair protocol (flip-sum, 3 contiguous folds = LFW folds 1-3);
* dense protocol — every image of the dev identities named in ``dev_pairs.txt`` (``images/``),
  all-vs-all, TAR at FAR 1e-5 .. 1e-2.

Usage::

    python benchmarks/eval_teacher.py \
        --model ../shared/models/sface/face_recognition_sface_2021dec_int8bq.onnx
    python benchmarks/eval_teacher.py --model mobilefacenet            # random weights: smoke run only
    python benchmarks/eval_teacher.py --model x-symbol.json            # MXNet (via efquant_fx.models.loader)

Prints a table and writes ``benchmarks/results/eval_teacher.json`` (numbers, versions, machine,
command, wall times) and a ROC plot next to it. Exit code 2 with one line for user errors.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, also when loaded by file path
from _common import default_shared, machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "eval_teacher.json"


def load_model(ref: str, weights: str | None = None):
    """A registry name (``create_model``), an ``.onnx`` file, or an MXNet ``-symbol.json``."""
    from efquant_fx.errors import EfquantError
    from efquant_fx.models import create_model, list_models

    path = Path(ref)
    if path.suffix.lower() == ".onnx":
        try:
            from efquant_fx.models.onnx_import import load_onnx_model
        except ImportError:
            raise EfquantError(
                "ONNX import is not available in this checkout (efquant_fx.models.onnx_import)",
                field="--model",
            ) from None
        return load_onnx_model(path).eval(), False
    if path.name.endswith("-symbol.json"):
        from efquant_fx.models.loader import load_model as _load

        return _load(path, weights), False
    if ref in list_models():
        return create_model(ref, weights=weights), weights is None
    raise EfquantError(
        f"{ref!r} is neither a model name ({', '.join(list_models())}) nor an .onnx file", field="--model"
    )


def run(
    model,
    shared: Path,
    out: Path,
    *,
    batch_size: int = 64,
    dense: bool = True,
    cache: Path | None = None,
    roc: Path | None = None,
    model_ref: str = "<module>",
    random_weights: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` and write the JSON (and ROC plot); returns the written document's key parts."""
    from efquant_fx.errors import EfquantError
    from efquant_fx.eval import compare_table, model_hash, plot_roc, write_metrics_json
    from efquant_fx.eval.dense import DenseVerification
    from efquant_fx.eval.verification import BinVerification

    lfw = shared / "data" / "lfw112"
    if not (lfw / "dev_pairs.bin").is_file():
        raise EfquantError("LFW-112 dev split not found (set EFQUANT_SHARED or --shared)", source=str(lfw))
    evaluators = [BinVerification(lfw / "dev_pairs.bin", n_folds=3, label="lfw_dev_3fold")]
    if dense:
        evaluators.append(
            DenseVerification(lfw / "images", pairs=lfw / "dev_pairs.txt", label="lfw_dev_dense")
        )
    results, walls = [], {}
    for ev in evaluators:
        start = time.perf_counter()
        results.append(ev.evaluate(model, batch_size=batch_size, cache=cache, progress=progress))
        walls[ev.label] = round(time.perf_counter() - start, 2)
    from rich.console import Console

    console = Console()
    title = Path(model_ref).name + (" (RANDOM WEIGHTS: smoke run)" if random_weights else "")
    console.print(compare_table(results, names=["model"], title=title))
    for r in results:
        if "n_pairs" in r.info:
            counts = f"{r.info['n_pairs']} pairs"
        else:
            counts = f"{r.info['n_genuine']} genuine / {r.info['n_impostor']} impostor pairs"
        console.print(f"{r.name}: {counts}, wall {walls[r.name]} s")
    extra = {
        "command": [Path(sys.executable).name, *sys.argv],
        "model": model_ref,
        "random_weights": random_weights,
        "data": str(lfw),
        "batch_size": batch_size,
        "wall_s": walls,
        "machine": {**machine(), "device": "cpu"},
        "curves_png": str(roc) if roc else None,
        "info": {r.name: r.info for r in results},
    }
    write_metrics_json(out, {"model": results}, model_hashes={"model": model_hash(model)}, extra=extra)
    if roc is not None:
        plot_roc(
            roc,
            {r.name: r for r in results if r.curve is not None},
            title=title,
            fars=(1e-5, 1e-4, 1e-3, 1e-2),
        )
    console.print(f"wrote {out}" + (f" and {roc}" if roc else ""))
    return {"results": results, "wall_s": walls}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="registry name, .onnx file, or MXNet -symbol.json")
    parser.add_argument("--weights", help="state dict for a registry model (insightface layout)")
    parser.add_argument(
        "--shared", type=Path, default=None, help="shared folder (default $EFQUANT_SHARED or ../shared)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--roc", type=Path, default=None, help="ROC PNG (default: next to --out)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature/image cache folder (optional)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense all-vs-all protocol")
    args = parser.parse_args(argv)

    import torch

    from efquant_fx.errors import EfquantError

    torch.set_num_threads(max(1, args.threads))
    try:
        model, random_weights = load_model(args.model, args.weights)
        roc = args.roc or args.out.with_name(args.out.stem + "_roc.png")
        run(
            model,
            args.shared or default_shared(),
            args.out,
            batch_size=args.batch_size,
            dense=not args.no_dense,
            cache=args.cache_dir,
            roc=roc,
            model_ref=args.model,
            random_weights=random_weights,
        )
    except EfquantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
