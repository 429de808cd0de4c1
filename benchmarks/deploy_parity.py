"""Issue 6: parity of the deployed int8 runtimes with the fake-quant PyTorch model on real faces.

For each real teacher (insightface MobileFaceNet y1, OpenCV Zoo SFace; loaded as in
``benchmarks/finetune.py``): PTQ W8A8 with the recipe ``benchmarks/finetune.py`` uses (per-channel
symmetric weights, per-tensor activations, percentile observer, BatchNorm kept, 128 calibration faces
from ``finetune.txt``, seed 0) with ``--act-points`` (default: ``compute_output`` added, so the
model already quantizes what an int8 conv writes and export adds nothing), then
``export_model(formats=("onnx_qcdq", "torch_int8"))``, then one embedding pass over the images of
the LFW dev pairs (``dev_pairs.txt``, 1,800 pairs, 3 folds; no flip) with every runtime:

* ``fp32``: the float teacher;
* ``fake_quant``: the compressed model (Brevitas forward) — the reference of the targets;
* ``fake_quant_exported``: the same with BN folded and the 8-bit output requantization points export
  adds for ``QLinearConv`` (:func:`efquant_fx.export.requant.add_output_points`, same calibration),
  i.e. the graph the int8 ONNX actually encodes (identical to ``fake_quant`` up to float rounding
  when the recipe has ``compute_output``);
* ``fake_quant_float64``: the compressed model itself run in float64: no runtime that does not
  repeat PyTorch's float32 operation order bit for bit can be expected to beat this cosine (a
  rounding flip at one 8-bit point moves everything after it);
* ``ort_<level>``: the int8 QCDQ ONNX in onnxruntime (CPU) at each graph optimization level in
  ``--ort-levels`` (``enable_all`` is onnxruntime's default and what ``efquant_fx.export.parity``
  and ``benchmarks/deploy.py`` use; ``disable_all`` runs the graph as written);
* ``torch_int8``: the torch.ao int8 TorchScript.

Per runtime: mean / min / 1st-percentile embedding cosine against ``fake_quant`` (and against
``fake_quant_exported``), 3-fold pair accuracy (insightface protocol,
:func:`efquant_fx.eval.verification.verification_result`) and its difference to ``fake_quant``.
Targets (issue 6): cosine >= 0.995 and |delta acc| <= 0.1 point. ``--pairs N`` uses every
(1800 // N)-th pair (each fold keeps its share) and only their images.

``--probe`` additionally runs the ``enable_all`` int8 ONNX with onnxruntime's individual graph
transformers switched off one at a time (session option ``optimization.disable_specified_optimizers``
via ``disabled_optimizers=``) on a 64-image subset, to find which fusion moves the numbers.

    OMP_NUM_THREADS=1 python benchmarks/deploy_parity.py --models mobilefacenet,sface --probe
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads starve a shared machine

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, also when loaded by file path
from _common import SHARED_NOTE, default_shared, load_teacher, machine, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "deploy_parity.json"
TARGET_COSINE = 0.995
TARGET_DACC = 0.1  # points
ORT_LEVELS = {"disable_all": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "layout": "ORT_ENABLE_LAYOUT", "enable_all": "ORT_ENABLE_ALL"}
warnings.filterwarnings("ignore")


class Pairs:
    """The dev pairs (every ``stride``-th) and their distinct images, preprocessed once."""

    def __init__(self, root: Path, n_pairs: int | None):
        import torch

        from efquant_fx.eval.embed import preprocess
        from efquant_fx.eval.images import ImageSet
        from efquant_fx.eval.pairs import read_pairs

        pl = read_pairs(root / "dev_pairs.txt", root / "images")
        total = len(pl.left)
        stride = max(1, total // n_pairs) if n_pairs else 1
        keep = list(range(0, total, stride))[: n_pairs or total]
        left = [pl.left[i] for i in keep]
        right = [pl.right[i] for i in keep]
        files = sorted(set(left) | set(right))
        index = {p: i for i, p in enumerate(files)}
        self.left = np.array([index[p] for p in left])
        self.right = np.array([index[p] for p in right])
        self.issame = np.array([pl.issame[i] for i in keep], dtype=bool)
        self.x = preprocess(ImageSet.from_files(files).pixels(progress=False))
        assert self.x.shape[1:] == torch.Size([3, 112, 112])
        self.info = {"pairs": len(keep), "pair_stride": stride, "same": int(self.issame.sum()),
                     "images": len(files), "flip": False}

    def accuracy(self, emb: np.ndarray) -> dict[str, Any]:
        from efquant_fx.eval.verification import verification_result

        res = verification_result("dev_pairs", "lfw_bin", emb[:, None, :], self.left, self.right, self.issame,
                                  n_folds=3, flip=False)
        return {"pair_acc": 100 * res.metrics["acc"], "pair_acc_std": 100 * res.metrics["acc_std"],
                "fold_acc": [100 * a for a in res.info["fold_accuracies"]]}


def embed_torch(model, x, batch: int = 64) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(x[i:i + batch]).float().numpy())
    return np.concatenate(out)


def ort_session(path: Path, level: str, threads: int, disabled: list[str] | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[level])
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled or None)


def embed_ort(sess, x, batch: int = 64) -> np.ndarray:
    name = sess.get_inputs()[0].name
    xn = x.numpy()
    return np.concatenate([sess.run(None, {name: np.ascontiguousarray(xn[i:i + batch])})[0]
                           for i in range(0, len(xn), batch)])


def cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def cos_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    c = cos_rows(a, b)
    return {"mean": float(c.mean()), "min": float(c.min()), "p01": float(np.percentile(c, 1))}


def ort_transformers(path: Path, threads: int) -> list[str]:
    """Names of onnxruntime graph transformers: a verbose-logged ``enable_all`` session prints them."""
    import re
    import subprocess

    code = ("import onnxruntime as ort, sys\n"
            "o = ort.SessionOptions(); o.log_severity_level = 0; o.intra_op_num_threads = 1\n"
            f"ort.InferenceSession({str(path)!r}, o, providers=['CPUExecutionProvider'])\n")
    log = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    log += subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr
    names = re.findall(r"GraphTransformer (\w+) modified", log)
    return list(dict.fromkeys(names))


def probe(path: Path, x, ref: np.ndarray, ref_ex: np.ndarray, threads: int) -> dict[str, Any]:
    """enable_all with one transformer (that modified the graph) disabled at a time."""
    names = ort_transformers(path, threads)
    out: dict[str, Any] = {"transformers_that_modified_graph": names, "images": int(len(x)), "disabled": {}}
    for name in names:
        try:
            emb = embed_ort(ort_session(path, "enable_all", threads, [name]), x)
        except Exception as exc:  # noqa: BLE001 - report and go on
            out["disabled"][name] = {"error": str(exc)[:200]}
            continue
        out["disabled"][name] = {"cosine_vs_fake_quant": cos_stats(emb, ref)["mean"],
                                 "cosine_vs_fake_quant_exported": cos_stats(emb, ref_ex)["mean"]}
        print(f"    probe: enable_all without {name}: cos {out['disabled'][name]['cosine_vs_fake_quant']:.5f}",
              flush=True)
    return out


def run_model(name: str, args: argparse.Namespace, pairs: Pairs) -> dict[str, Any]:
    import torch

    from efquant_fx import compress
    from efquant_fx.data.calibration import calibration_batches
    from efquant_fx.export import export_model
    from efquant_fx.export.bn_fold import fold_quantized_batchnorm
    from efquant_fx.export.requant import add_output_points

    root = args.shared / "data" / "lfw112"
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    from efquant_fx.errors import EfquantError

    try:
        teacher = load_teacher(name, args.shared)
    except EfquantError as exc:  # an unknown name ends the run with the message, as before
        raise SystemExit(str(exc)) from None
    data = {"kind": "list", "list": str(root / "finetune.txt"), "root": str(root), "verify": "header"}
    quant = {"weight_bits": 8, "act_bits": 8, "observer": "percentile", "batchnorm": "keep", "layers": [],
             "act_points": args.act_points}
    recipe = {"name": f"{name}_w8a8", "device": "cpu", "seed": 0, "quant": quant,
              "calibration": {"images": args.calib_images, "batch_size": 32, "data": data}}
    result = compress(teacher, recipe)
    timings["compress_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out_dir = args.workdir / name
    reports = export_model(result, out_dir, formats=("onnx_qcdq", "torch_int8"))
    timings["export_s"] = time.perf_counter() - t0
    q, t8 = reports["onnx_qcdq"], reports["torch_int8"]
    # the fake-quant graph the ONNX encodes: the compressed model + export's output requantization points
    cal = calibration_batches(result.recipe.calibration.data, result.recipe.calibration.images,
                              result.recipe.calibration.batch_size, result.recipe.seed)
    exported = copy.deepcopy(result.model).cpu().eval()
    fold_quantized_batchnorm(exported)
    rq = result.recipe.quant
    added = add_output_points(exported, [b.float().cpu() for b in cal], symmetric=rq.act_symmetric,
                              observer=rq.observer, include_linear=False)

    x = pairs.x
    emb: dict[str, np.ndarray] = {}
    secs: dict[str, float] = {}

    def timed(key: str, fn) -> None:
        t = time.perf_counter()
        emb[key] = fn()
        secs[key] = round(time.perf_counter() - t, 1)
        print(f"    {name} {key}: {secs[key]} s", flush=True)

    timed("fp32", lambda: embed_torch(teacher, x))
    timed("fake_quant", lambda: embed_torch(result.model.eval(), x))
    if "fake_quant_exported" not in args.skip:
        timed("fake_quant_exported", lambda: embed_torch(exported, x))
    if "fake_quant_float64" not in args.skip:
        as_double = copy.deepcopy(result.model).cpu().eval().double()
        timed("fake_quant_float64", lambda: embed_torch(lambda t: as_double(t.double()), x))
    for level in args.ort_levels:
        timed(f"ort_{level}", lambda level=level: embed_ort(ort_session(Path(q.path), level, args.threads), x))
    torch.backends.quantized.engine = t8.engine
    ts = torch.jit.load(t8.path)
    timed("torch_int8", lambda: embed_torch(ts, x))

    ref = emb["fake_quant"]
    ref_ex = emb.get("fake_quant_exported", ref)
    base = pairs.accuracy(ref)
    rows: dict[str, Any] = {}
    for key, e in emb.items():
        acc = base if key == "fake_quant" else pairs.accuracy(e)
        row = {"cosine_vs_fake_quant": cos_stats(e, ref), "cosine_vs_fake_quant_exported": cos_stats(e, ref_ex),
               **acc, "delta_acc_vs_fake_quant": acc["pair_acc"] - base["pair_acc"], "embed_s": secs[key]}
        if key not in ("fp32", "fake_quant", "fake_quant_float64"):
            row["meets_cosine"] = row["cosine_vs_fake_quant"]["mean"] >= TARGET_COSINE
            row["meets_min_cosine"] = row["cosine_vs_fake_quant"]["min"] >= TARGET_COSINE
            row["meets_acc"] = abs(row["delta_acc_vs_fake_quant"]) <= TARGET_DACC + 1e-9
        rows[key] = row
        print(f"  {name} {key:22s} cos mean {row['cosine_vs_fake_quant']['mean']:.5f} "
              f"min {row['cosine_vs_fake_quant']['min']:.5f} acc {row['pair_acc']:.2f} "
              f"d {row['delta_acc_vs_fake_quant']:+.2f}", flush=True)
    out: dict[str, Any] = {
        "recipe": recipe | {"calibration": {**recipe["calibration"], "data": "finetune.txt list (lfw112)"}},
        "export": {"onnx_file_bytes": q.bytes, "added_output_points": q.added_output_points,
                   "added_output_points_reference_copy": len(added),
                   "export_check_16_faces": {"cosine": q.cosine, "cosine_vs_compressed": q.cosine_vs_compressed,
                                             "between_levels": q.cosine_between_levels},
                   "runtime_op_counts_enable_all": q.runtime_op_counts, "float_compute": q.float_compute,
                   "torch_int8_engine": t8.engine, "torch_int8_float_modules": t8.float_modules},
        "fidelity_vs_fp32": result.fidelity, "rows": rows, "timings_s": timings, "dev": pairs.info,
        "ort_levels": args.ort_levels, "command": " ".join(sys.argv),
    }
    if args.probe:
        n = min(args.probe_images, len(x))
        out["probe"] = probe(Path(q.path), x[:n], ref[:n], ref_ex[:n], args.threads)
    return out


def markdown_table(report: dict[str, Any]) -> str:
    lines = ["| teacher | runtime | cos vs fake-quant mean / min | cos vs exported fake-quant mean | pair acc % "
             "| Δacc vs fake-quant (pt) | target |",
             "|---|---|---:|---:|---:|---:|---|"]
    for model, res in report["results"].items():
        for key, r in res["rows"].items():
            c = r["cosine_vs_fake_quant"]
            if key in ("fp32", "fake_quant", "fake_quant_float64"):
                flag = {"fake_quant": "reference", "fake_quant_float64": "floor (same model, float64)"}.get(key, "-")
            else:
                flag = "met" if (r["meets_cosine"] and r["meets_acc"]) else (
                    "**missed** (" + ", ".join(k for k, ok in (("cosine", r["meets_cosine"]), ("acc", r["meets_acc"]))
                                                if not ok) + ")")
            lines.append(f"| {model} | {key} | {c['mean']:.4f} / {c['min']:.4f} | "
                         f"{r['cosine_vs_fake_quant_exported']['mean']:.4f} | "
                         f"{r['pair_acc']:.2f} ± {r['pair_acc_std']:.2f} | "
                         f"{r['delta_acc_vs_fake_quant']:+.2f} | {flag} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilefacenet,sface", type=lambda s: s.split(","),
                    help="comma list: mobilefacenet, sface")
    ap.add_argument("--shared", type=Path, default=default_shared(), help="EFQUANT_SHARED (default ../shared)")
    ap.add_argument("--pairs", type=int, default=None, help="use N of the 1,800 dev pairs (every 1800//N-th)")
    ap.add_argument("--ort-levels", default="disable_all,basic,extended,enable_all", type=lambda s: s.split(","),
                    help=f"comma list of onnxruntime levels: {', '.join(ORT_LEVELS)}")
    ap.add_argument("--calib-images", type=int, default=128)
    ap.add_argument("--act-points", default="compute_input,compute_output,prelu,residual_add",
                    type=lambda s: s.split(","),
                    help="quant.act_points (compute_output: the recipe already has the points int8 kernels need)")
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--skip", default="", type=lambda s: [r for r in s.split(",") if r],
                    help="rows to leave out: fake_quant_exported, fake_quant_float64 (the slow one)")
    ap.add_argument("--probe", action="store_true", help="enable_all with each ORT transformer disabled in turn")
    ap.add_argument("--probe-images", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "efquant_deploy_parity")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    bad = [lv for lv in args.ort_levels if lv not in ORT_LEVELS]
    if bad:
        ap.error(f"unknown --ort-levels {bad}")
    if not (args.shared / "data" / "lfw112" / "dev_pairs.txt").is_file():
        print(f"error: real data not found under {args.shared} (set EFQUANT_SHARED)", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pairs = Pairs(args.shared / "data" / "lfw112", args.pairs)
    print(f"[deploy_parity] {pairs.info}", flush=True)
    report: dict[str, Any] = {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python " + " ".join(
            [os.path.relpath(sys.argv[0], REPO) if argv is None else "benchmarks/deploy_parity.py",
             *(sys.argv[1:] if argv is None else argv)]),
        "dev": pairs.info, "targets": {"cosine_vs_fake_quant_min_mean": TARGET_COSINE, "abs_delta_acc_pt": TARGET_DACC},
        "method": "no flip; cosine of raw embeddings per image (float64); pair accuracy: insightface 3-fold "
                  "protocol on L2-normalised embeddings; every runtime sees the same preprocessed float32 batch "
                  "of 64 images",
        "results": {}, "wall_s": {},
    }

    def write() -> None:
        report["wall_s"]["total"] = round(time.perf_counter() - t0, 1)
        report["machine"] = {**machine(args.threads), "shared": SHARED_NOTE}
        report["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        report["table_md"] = markdown_table(report)
        write_json(args.out, report)

    for name in args.models:
        t = time.perf_counter()
        print(f"[deploy_parity] {name} ...", flush=True)
        report["results"][name] = run_model(name, args, pairs)
        report["wall_s"][name] = round(time.perf_counter() - t, 1)
        write()
    print("\n" + report["table_md"])
    print(f"\ntotal wall time {report['wall_s']['total']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
