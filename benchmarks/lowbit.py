"""Issue 14: low-bit students of real face teachers, stage by stage, on the whole LFW dev split.

Teachers (``$EFQUANT_SHARED/models``): insightface MobileFaceNet-y1 (MXNet, fp32) and OpenCV SFace
(ONNX, weights already on an int8 block grid). Calibration and learned rounding use faces of
``finetune.txt`` (identity-disjoint from the dev split); nothing is tuned on the dev pairs.

Evaluation (``--quick`` uses every 6th pair and no flip): one embedding pass per model over the dev
images gives (a) 3-fold accuracy on all 1,800 ``dev_pairs`` (flip-sum) and (b) the dense protocol:
TAR at FAR 1e-3/1e-4/1e-5 over every pair of dev images with at most 10 images per identity (the
first 10 by file name). Rows per bit width (W8A8, W4A8, W4A4), each adding one stage to the last:

* ``ptq``: round-to-nearest, percentile activation observer, BatchNorm folded;
* ``+prelu_eq``: per-channel range equalization across PReLU (``ptq.prelu_equalization``);
* ``+rounding``: learned rounding, layer by layer (``ptq.learned_rounding``);
* ``+budget`` (W4A8, W4A4): ``+prelu_eq`` with the role rules replaced by ``quant.budget`` (layers
  raised to 8 bits by measured sensitivity, average weight bits <= 4.5, W4A4 input bits <= 5.0);
* ``recipe``: the shipped ``efquant_fx/recipes/mobilefacenet_wXaY.yaml`` itself, as ``efquant-fx apply`` runs it.

Every row reports its wall time (compression only), the images it used, and, for the students, the
parameter-weighted weight bits and MAC-weighted activation bits. The ``headline`` holds the deltas
(points, against the teacher measured in the same run) the issue names.

    python benchmarks/lowbit.py --quick --models mobilefacenet      # minutes
    python benchmarks/lowbit.py                                     # full protocol, both teachers

Prints a table; writes ``benchmarks/results/lowbit.json`` (numbers, settings, machine, command line).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, also when loaded by file path
from _common import SHARED_NOTE, default_shared, load_teacher, machine, write_json  # noqa: E402

from efquant_fx.graph.frozen import frozen_quantizers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "lowbit.json"
RECIPES = REPO / "efquant_fx" / "recipes"  # the shipped recipes
FARS = (1e-3, 1e-4, 1e-5)
BITS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}
KEEP8 = {  # layers kept at 8 bit, by role (transfers between backbones)
    "w8a8": [],
    "w4a8": [{"role": "stem", "weight_bits": 8}, {"role": "embedding", "weight_bits": 8}],
    "w4a4": [{"role": "stem", "weight_bits": 8, "act_bits": 8}, {"role": "embedding", "weight_bits": 8, "act_bits": 8},
             {"role": "depthwise", "weight_bits": 8, "act_bits": 8}],
}
BUDGET = {  # quant.budget instead of the role rules: the averages the issue allows W4A4 (W4A8: same weights)
    "w4a8": {"weight_bits": 4.5},
    "w4a4": {"weight_bits": 4.5, "act_bits": 5.0},
}
ACT_POINTS = {  # W4A4 has no int8 kernel to match, so no compute_output points
    "w8a8": ["compute_input", "compute_output", "prelu", "residual_add"],
    "w4a8": ["compute_input", "compute_output", "prelu", "residual_add"],
    "w4a4": ["compute_input", "prelu", "residual_add"],
}


class DevEval:
    """The dev split embedded once per model: pair accuracy on dev_pairs and the capped dense protocol."""

    def __init__(self, root: Path, stride: int, flip: bool, cap: int = 10):
        import numpy as np

        from efquant_fx.eval.images import ImageSet
        from efquant_fx.eval.pairs import lfw_identities, read_pairs

        pl = read_pairs(root / "dev_pairs.txt", root / "images")
        keep = list(range(0, len(pl.left), stride))
        left, right = [pl.left[i] for i in keep], [pl.right[i] for i in keep]
        dense = [p for ident in lfw_identities(root / "dev_pairs.txt")
                 for p in sorted((root / "images" / ident).glob("*.jpg"))[:cap]]
        if stride > 1:  # quick: only identities that appear in the kept pairs
            ids = {p.parent.name for p in left + right}
            dense = [p for p in dense if p.parent.name in ids]
        files = sorted(set(left) | set(right) | set(dense))
        index = {p: i for i, p in enumerate(files)}
        self.left, self.right = np.array([index[p] for p in left]), np.array([index[p] for p in right])
        self.issame = np.array([pl.issame[i] for i in keep], dtype=bool)
        self.dense = np.array([index[p] for p in dense])
        names = sorted({p.parent.name for p in dense})
        self.labels = np.array([names.index(p.parent.name) for p in dense])
        self.images = ImageSet.from_files(files)
        self.flip = flip
        counts = np.bincount(self.labels)
        genuine = int((counts * (counts - 1) // 2).sum())
        self.info = {"pairs": len(keep), "pair_stride": stride, "images_embedded": len(files), "flip": flip,
                     "dense_images": len(dense), "dense_identities": len(names), "dense_cap": cap,
                     "dense_genuine": genuine, "dense_impostor": len(dense) * (len(dense) - 1) // 2 - genuine}

    def evaluate(self, model) -> dict[str, float]:
        import numpy as np

        from efquant_fx.eval.dense import dense_tar_at_far
        from efquant_fx.eval.embed import extract_embeddings, l2_normalize
        from efquant_fx.eval.verification import verification_result

        feats = extract_embeddings(model, self.images, flip=self.flip, batch_size=64, progress=False)  # frozen inside
        res = verification_result("dev_pairs", "lfw_bin", feats, self.left, self.right, self.issame,
                                  n_folds=3, flip=self.flip)
        emb = l2_normalize(feats.sum(axis=1) if self.flip else feats[:, 0]).astype(np.float32)
        tars, _ = dense_tar_at_far(emb[self.dense], self.labels, list(FARS))
        out = {"pair_acc": 100 * res.metrics["acc"], "pair_acc_std": 100 * res.metrics["acc_std"]}
        out.update({f"tar_far{f:.0e}": 100 * tars[f] for f in FARS})
        return out


def average_bits(model) -> dict[str, float]:
    """Parameter-weighted weight bits and MAC-weighted input-activation bits of the conv/linear layers
    (a float layer or input counts 32)."""
    import torch
    from brevitas.nn import QuantConv2d, QuantLinear
    from torch import nn

    from efquant_fx.graph.reconstruct import quantized_layers

    points = {name: point for name, _layer, point in quantized_layers(model)}
    macs, shapes = {}, {}

    def hook(name):
        def record(m, args, out):
            shapes[name] = out.shape
        return record

    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    with torch.no_grad(), frozen_quantizers(model):
        model(torch.zeros(1, 3, 112, 112))
    for h in handles:
        h.remove()
    w_num = w_den = a_num = a_den = 0.0
    for name, m in layers.items():
        out = shapes[name]
        spatial = out[2] * out[3] if len(out) == 4 else 1
        macs[name] = m.weight.numel() * spatial
        quant = isinstance(m, QuantConv2d | QuantLinear)
        wbits = int(m.quant_weight().bit_width) if quant else 32
        point = points.get(name)
        abits = point.bits if point is not None and point.mode == "quant" else 32
        w_num, w_den = w_num + wbits * m.weight.numel(), w_den + m.weight.numel()
        a_num, a_den = a_num + abits * macs[name], a_den + macs[name]
    return {"avg_weight_bits": round(w_num / w_den, 3), "avg_act_bits": round(a_num / a_den, 3)}


def stage_recipes(bits: str, data: dict[str, Any], calib_images: int, rounding: dict[str, Any]) -> dict[str, dict]:
    wb, ab = BITS[bits]
    quant = {"weight_bits": wb, "act_bits": ab, "observer": "percentile", "batchnorm": "fold",
             "act_points": ACT_POINTS[bits], "layers": KEEP8[bits]}
    base = {"name": f"bench_{bits}", "device": "cpu", "seed": 0, "quant": quant,
            "calibration": {"images": calib_images, "batch_size": 32, "data": data}}
    stages = {"ptq": base,
              "+prelu_eq": {**base, "ptq": {"prelu_equalization": 1.0}},
              "+rounding": {**base, "ptq": {"prelu_equalization": 1.0, "learned_rounding": rounding}}}
    if bits in BUDGET:  # sensitivity-chosen 8-bit layers in place of the role rules, on top of +prelu_eq
        budget = {**quant, "layers": [], "budget": BUDGET[bits]}
        stages["+budget"] = {**base, "quant": budget, "ptq": {"prelu_equalization": 1.0}}
    return stages


def run_row(teacher, recipe, dev: DevEval, overrides: list[str]) -> dict[str, Any]:
    from efquant_fx import compress

    t0 = time.perf_counter()
    result = compress(copy.deepcopy(teacher), recipe, overrides=overrides)
    wall = time.perf_counter() - t0
    cal = result.recipe.calibration
    row = {"wall_s": round(wall, 1), "calibration_images": cal.images, "fidelity": result.fidelity,
           "images_seen": cal.images, **average_bits(result.model)}
    lr = result.recipe.ptq.learned_rounding
    if lr is not None:
        row["rounding_steps_per_layer"] = lr.iters
    t0 = time.perf_counter()
    row["metrics"] = dev.evaluate(result.model)
    row["eval_s"] = round(time.perf_counter() - t0, 1)
    return row


def delta(row: dict[str, Any], teacher: dict[str, Any], key: str) -> float:
    return round(row["metrics"][key] - teacher["metrics"][key], 2)


def headline(report: dict[str, Any]) -> dict[str, Any]:
    rows = report["results"].get("mobilefacenet", {})
    if "teacher" not in rows:
        return {}
    out: dict[str, Any] = {}
    for bits in BITS:
        row = rows.get(f"{bits} recipe") or rows.get(f"{bits} +rounding")
        if row is None:
            continue
        out[f"mobilefacenet_{bits}_pair_delta_pt"] = delta(row, rows["teacher"], "pair_acc")
        out[f"mobilefacenet_{bits}_tar1e4_delta_pt"] = delta(row, rows["teacher"], "tar_far1e-04")
    recipe_rows = [r for name, r in rows.items() if name.endswith(" recipe")]
    out["wall_s_max"] = max((r["wall_s"] for r in recipe_rows), default=None)
    w4a4 = rows.get("w4a4 recipe") or rows.get("w4a4 +rounding")
    if w4a4 is not None:
        out["w4a4_avg_weight_bits"] = w4a4["avg_weight_bits"]
        out["w4a4_avg_act_bits"] = w4a4["avg_act_bits"]
    return out


def markdown_table(report: dict[str, Any]) -> str:
    lines = ["| teacher | row | pair acc % | TAR@1e-3 % | TAR@1e-4 % | TAR@1e-5 % | Δpair | ΔTAR@1e-4 | "
             "W bits | A bits | images | wall s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model_name, rows in report["results"].items():
        t = rows.get("teacher")
        for name, r in rows.items():
            m = r["metrics"]
            d = ("", "") if t is None or r is t else (f"{delta(r, t, 'pair_acc'):+.2f}",
                                                      f"{delta(r, t, 'tar_far1e-04'):+.2f}")
            lines.append(f"| {model_name} | {name} | {m['pair_acc']:.2f} | {m['tar_far1e-03']:.2f} | "
                         f"{m['tar_far1e-04']:.2f} | {m['tar_far1e-05']:.2f} | {d[0]} | {d[1]} | "
                         f"{r.get('avg_weight_bits', 32)} | {r.get('avg_act_bits', 32)} | "
                         f"{r.get('images_seen', 0)} | {r.get('wall_s', '')} |")
    return "\n".join(lines)


def run_teacher(name: str, args: argparse.Namespace, dev: DevEval, report: dict[str, Any], write) -> None:
    root = args.shared / "data" / "lfw112"
    teacher = load_teacher(name, args.shared)
    rows: dict[str, Any] = report["results"].setdefault(name, {})
    t0 = time.perf_counter()
    rows["teacher"] = {"metrics": dev.evaluate(teacher), "eval_s": round(time.perf_counter() - t0, 1)}
    print(f"{name} teacher {rows['teacher']['metrics']}", flush=True)
    data = {"kind": "list", "list": str(root / "finetune.txt"), "root": str(root), "verify": "header"}
    rounding = {"iters": args.rounding_iters}
    for bits in args.bits:
        stages = stage_recipes(bits, data, args.calib_images, rounding)
        for stage in args.stages:
            if stage == "recipe":
                path = RECIPES / f"{name}_{bits}.yaml"
                if not path.is_file():
                    print(f"{name} {bits}: no shipped recipe {path.name}; row skipped", flush=True)
                    continue
                rows[f"{bits} recipe"] = run_row(teacher, path, dev, [])
                rows[f"{bits} recipe"]["recipe"] = str(path.relative_to(REPO))
            elif stage in stages:
                rows[f"{bits} {stage}"] = run_row(teacher, stages[stage], dev, [])
            else:
                continue
            key = f"{bits} {stage}"
            print(f"{name} {key} {rows[key]['metrics']} wall {rows[key]['wall_s']} s", flush=True)
            write()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="every 6th dev pair, no flip, fewer rounding steps")
    ap.add_argument("--shared", type=Path, default=default_shared(), help="EFQUANT_SHARED (default ../shared)")
    ap.add_argument("--models", default="mobilefacenet,sface", type=lambda s: s.split(","))
    ap.add_argument("--bits", default="w8a8,w4a8,w4a4", type=lambda s: s.split(","))
    ap.add_argument("--stages", default="ptq,+prelu_eq,+rounding,recipe", type=lambda s: s.split(","))
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--rounding-iters", type=int, default=None, help="learned-rounding steps per layer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows already in --out (same mode) and replace only the rows measured now")
    args = ap.parse_args(argv)
    args.rounding_iters = args.rounding_iters or (50 if args.quick else 200)
    if not (args.shared / "data" / "lfw112" / "dev_pairs.txt").is_file():
        print(f"error: real data not found under {args.shared} (set EFQUANT_SHARED)", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("EFQUANT_SHARED", str(args.shared))  # the shipped recipes read their data from it
    t0 = time.perf_counter()
    dev = DevEval(args.shared / "data" / "lfw112", 6 if args.quick else 1, flip=not args.quick)
    report: dict[str, Any] = {"results": {}, "dev": dev.info, "mode": "quick" if args.quick else "full",
                              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    if args.merge and args.out.is_file():
        import json

        old = json.loads(args.out.read_text())
        if old.get("mode") == report["mode"] and old.get("dev") == dev.info:
            report["results"] = old["results"]
            report["earlier_commands"] = old.get("earlier_commands", []) + [old.get("command")]

    def write() -> None:  # after every row: a cut-short run keeps what it measured
        report["headline"] = headline(report)
        report["wall_s_total"] = round(time.perf_counter() - t0, 1)
        report["machine"] = {**machine(args.threads), "shared": SHARED_NOTE}
        report["command"] = [sys.executable, *sys.argv] if argv is None else ["benchmarks/lowbit.py", *argv]
        report["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        report["table_md"] = markdown_table(report)
        write_json(args.out, report)

    for name in args.models:
        run_teacher(name, args, dev, report, write)
    print("\n" + report["table_md"])
    print(f"\nheadline: {report['headline']}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
