"""PTQ vs fine-tuned (KD+EKD) vs data-free fine-tuned, on a real teacher and real LFW-112 faces.

Teachers: insightface MobileFaceNet y1 (MXNet, ``$EFQUANT_SHARED/models/insightface_mobilefacenet_y1``)
and optionally SFace (ONNX, ``--models mobilefacenet,sface``). Data (``$EFQUANT_SHARED/data/lfw112``):

* calibration and fine-tuning: ``finetune.txt`` (6,181 images of 3,175 identities; fine-tuning uses
  the 705 identities with >= 2 images, P=8 (quick) or 16 identities x K=2 images per batch);
* held-out fidelity: teacher-student embedding cosine on a fixed sample of dev images (identities of
  ``dev_pairs.txt``, disjoint from ``finetune.txt``);
* with ``--eval pairs`` (default in full mode): 3-fold pair accuracy on ``dev_pairs.bin``
  (insightface protocol, flip-sum) and with ``--eval dense`` also all-vs-all TAR@FAR on dev images,
  both through :mod:`efquant_fx.eval`.

Configurations (per teacher; activation observer ``percentile``, BatchNorm kept unfolded as in
QuantFace, first conv and last linear at 8 bit below 8 bits): ``ptq_w8a8``, ``ptq_w6a6``, ``ptq_w4a4``;
``ft_w6a6`` / ``ft_w4a4`` (PTQ + KD+EKD fine-tune on real faces: ``kd_cosine`` (QuantFace's MSE
on normalised embeddings times d/2) + ``ekd``, AdamW, cosine LR, BN statistics kept at the teacher's);
``df_ptq_w6a6``, ``df_ft_w6a6``, ``df_ft_w4a4`` (data-free: calibration and
fine-tune on images synthesized from the teacher's BN statistics); full mode adds ``ft_w8a8`` and
``df_ptq_w4a4``. W6A6 is QuantFace's low-bit setting; on MobileFaceNet 4-bit activations collapse the
embedding after PTQ (cosine ~0), which a short fine-tune does not undo.

    python benchmarks/finetune.py --quick          # ~10 min on 2 shared CPU cores (measured)
    python benchmarks/finetune.py                  # full: more steps, pair accuracy

Prints a table; writes ``benchmarks/results/finetune.json`` (numbers, settings, machine, command line).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads starve a shared machine
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "finetune.json"
SYNTH_STEPS = 6  # efquant_fx.data.synthetic.DEFAULTS["steps"], kept here so --help does not import torch


def default_shared() -> Path:
    return Path(os.environ.get("EFQUANT_SHARED", REPO.parent / "shared"))


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def load_teacher(name: str, shared: Path):
    from efquant_fx.errors import EfquantError

    if name == "mobilefacenet":
        from efquant_fx.models.mxnet_import import load_mxnet_model

        d = shared / "models" / "insightface_mobilefacenet_y1"
        return load_mxnet_model(d / "model-symbol.json", d / "model-0000.params").eval()
    if name == "sface":
        from efquant_fx.models.onnx_import import load_onnx_model

        return load_onnx_model(shared / "models" / "sface" / "face_recognition_sface_2021dec_int8bq.onnx").eval()
    raise EfquantError(f"unknown teacher {name!r} (mobilefacenet, sface)", field="--models")


def edge_layers_rule(teacher) -> str:
    """Regex naming the first Conv2d and the last Linear in execution order (kept at 8 bit)."""
    import re

    from torch import nn

    from efquant_fx.graph.trace import trace

    gm = trace(copy.deepcopy(teacher))
    order = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    types = {name: type(m) for name, m in gm.named_modules()}
    convs = [t for t in order if issubclass(types[t], nn.Conv2d)]
    linears = [t for t in order if issubclass(types[t], nn.Linear)] or convs
    return f"^({re.escape(convs[0])}|{re.escape(linears[-1])})$"


def dev_images(shared: Path, n: int, seed: int = 0):
    """A fixed random sample of ``n`` dev images (identities of dev_pairs.txt) as a [-1, 1] tensor."""
    import torch

    from efquant_fx.data.transforms import FaceTransform, decode_image
    from efquant_fx.eval.pairs import lfw_identities

    root = shared / "data" / "lfw112"
    identities = lfw_identities(root / "dev_pairs.txt")
    files = sorted(p for ident in identities for p in (root / "images" / ident).glob("*.jpg"))
    random.Random(seed).shuffle(files)
    tf = FaceTransform(train=False)
    return torch.stack([tf(decode_image(p)) for p in files[:n]])


def pick_threads(teacher, requested: str) -> int:
    """``auto``: time the teacher on 1 and 2 threads and keep the faster (on a shared machine two
    OpenMP threads can be several times slower than one); otherwise the given number."""
    import torch

    if requested != "auto":
        torch.set_num_threads(int(requested))
        return int(requested)
    x = torch.rand(8, 3, 112, 112) * 2 - 1
    best, best_t = 1, float("inf")
    for n in (1, 2) if (os.cpu_count() or 1) >= 2 else (1,):
        torch.set_num_threads(n)
        with torch.no_grad():
            teacher(x)
            t0 = time.perf_counter()
            teacher(x)
            teacher(x)
        if (dt := time.perf_counter() - t0) < best_t:
            best, best_t = n, dt
    torch.set_num_threads(best)
    return best


def configs_for(args: argparse.Namespace, rule: str, data: dict[str, Any], ft_data: dict[str, Any],
                synth: dict[str, Any], model_name: str) -> dict[str, dict[str, Any]]:
    """The recipes compared: PTQ at 8/6/4 bits, fine-tuned (KD+EKD) and data-free variants."""
    edge8 = [{"match": rule, "weight_bits": 8, "act_bits": 8}]
    quant = {"observer": "percentile", "batchnorm": "keep"}
    w8 = {**quant, "weight_bits": 8, "act_bits": 8}
    w6 = {**quant, "weight_bits": 6, "act_bits": 6, "layers": edge8}
    w4 = {**quant, "weight_bits": 4, "act_bits": 4, "layers": edge8}
    ekd = {"weight": args.ekd_weight}
    if args.ekd_momentum is not None:
        ekd["options"] = {"momentum": args.ekd_momentum}
    finetune = {"steps": args.steps, "identities_per_batch": args.identities, "images_per_identity": 2,
                "optimizer": "adamw", "lr": args.lr, "weight_decay": 0.0, "schedule": "cosine",
                "warmup_steps": max(1, args.steps // 20), "clip_grad_norm": 5.0, "batchnorm": "teacher",
                "calibrate_steps": 0, "losses": {"kd_cosine": {"weight": 1.0}, "ekd": ekd},
                "checkpoint_every": 10**6}

    def recipe(q: dict[str, Any], calib_data: dict[str, Any], ft_data_: dict[str, Any] | None = None):
        spec: dict[str, Any] = {"name": model_name, "device": "cpu", "seed": 0, "quant": q,
                                "calibration": {"images": args.calib_images, "batch_size": 32, "data": calib_data}}
        if ft_data_ is not None:
            spec["finetune"] = {**finetune, "data": ft_data_}
        return spec

    configs = {
        "ptq_w8a8": recipe(w8, data),
        "ptq_w6a6": recipe(w6, data),
        "ptq_w4a4": recipe(w4, data),
        "ft_w6a6": recipe(w6, data, ft_data),
        "ft_w4a4": recipe(w4, data, ft_data),
        "df_ptq_w6a6": recipe(w6, synth),
        "df_ft_w6a6": recipe(w6, synth, synth),
        "df_ft_w4a4": recipe(w4, synth, synth),
    }
    if not args.quick:
        configs["ft_w8a8"] = recipe(w8, data, ft_data)
        configs["df_ptq_w4a4"] = recipe(w4, synth)
    return {k: v for k, v in configs.items() if not args.only or k in args.only}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from efquant_fx import compress
    from efquant_fx.finetune import fidelity_evaluator

    shared = args.shared
    root = shared / "data" / "lfw112"
    data = {"kind": "list", "list": str(root / "finetune.txt"), "root": str(root), "verify": "header"}
    ft_data = {**data, "min_images_per_identity": 2}
    synth = {"kind": "synthetic", "n": args.synthetic_n, "cache": str(args.cache / "synthetic"),
             "steps": args.synthetic_steps}
    evaluators = []
    if "pairs" in args.eval:
        from efquant_fx.eval.verification import BinVerification

        evaluators.append(BinVerification(root / "dev_pairs.bin", n_folds=3, flip=True, label="lfw_dev_3fold"))
    if "dense" in args.eval:
        from efquant_fx.eval.dense import DenseVerification

        evaluators.append(DenseVerification(root / "images", pairs=root / "dev_pairs.txt", label="lfw_dev_dense"))

    report: dict[str, Any] = {"results": {}, "settings": {}, "wall_s": {}}
    for model_name in args.models:
        t_model = time.perf_counter()
        teacher = load_teacher(model_name, shared)
        report["threads"] = pick_threads(teacher, args.threads)
        held = dev_images(shared, args.held_out)
        fidelity = fidelity_evaluator(teacher, held)
        rule = edge_layers_rule(teacher)
        configs = configs_for(args, rule, data, ft_data, synth, model_name)
        results: dict[str, Any] = {}
        if evaluators:
            results["float"] = {"metrics": evaluate(evaluators, teacher, args)}
        for name, spec in configs.items():
            t0 = time.perf_counter()
            result = compress(teacher, spec)
            wall = time.perf_counter() - t0
            row: dict[str, Any] = {"wall_s": round(wall, 1),
                                   "timings_s": {k: round(v, 1) for k, v in result.timings.items()}}
            row.update({f"held_out_{k}": v for k, v in fidelity(result.model).items()})
            train = [h for h in result.history if h["kind"] == "train"]
            if train:
                tail = train[-10:]
                row.update(steps=len(train), first_loss=train[0]["loss"],
                           last_loss=sum(h["loss"] for h in tail) / len(tail),
                           images_per_s=round(sum(h["images_per_s"] for h in train) / len(train), 1))
            if evaluators:
                row["metrics"] = evaluate(evaluators, result.model, args)
            row["notes"] = result.notes
            results[name] = row
            print(f"  {model_name} {name}: held-out cosine {row['held_out_cosine_mean']:.4f} "
                  f"(min {row['held_out_cosine_min']:.4f}) in {wall:.0f}s", flush=True)
        report["results"][model_name] = results
        report["settings"][model_name] = {"recipes": configs, "edge_layers_at_8_bit": rule,
                                          "held_out_images": len(held)}
        report["wall_s"][model_name] = round(time.perf_counter() - t_model, 1)
    return report


def evaluate(evaluators, model, args) -> dict[str, float]:
    out: dict[str, float] = {}
    for ev in evaluators:
        res = ev.evaluate(model, batch_size=64, cache=args.cache / "features", progress=False)
        out.update({f"{res.name}/{k}": v for k, v in res.metrics.items() if k not in ("xnorm",)})
    return out


def print_table(report: dict[str, Any]) -> None:
    for model_name, rows in report["results"].items():
        metric_keys = sorted({k for r in rows.values() for k in r.get("metrics", {})})
        head = ["config", "cos mean", "cos min", "steps", "wall s", *metric_keys]
        print(f"\n{model_name}")
        print(" | ".join(head))
        print(" | ".join("---" for _ in head))
        for name, r in rows.items():
            cells = [name, f"{r['held_out_cosine_mean']:.4f}" if "held_out_cosine_mean" in r else "1 (teacher)",
                     f"{r['held_out_cosine_min']:.4f}" if "held_out_cosine_min" in r else "",
                     str(r.get("steps", "")), str(r.get("wall_s", ""))]
            cells += [f"{r.get('metrics', {}).get(k, float('nan')):.4f}" for k in metric_keys]
            print(" | ".join(cells))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few steps, no pair evaluation: < 15 min on 2 CPU cores")
    ap.add_argument("--shared", type=Path, default=default_shared(), help="EFQUANT_SHARED (default ../shared)")
    ap.add_argument("--models", default="mobilefacenet", type=lambda s: s.split(","),
                    help="comma list: mobilefacenet, sface")
    ap.add_argument("--only", type=lambda s: s.split(","), default=None, help="comma list of configs to run")
    ap.add_argument("--steps", type=int, default=None, help="fine-tune steps (quick 60, full 600)")
    ap.add_argument("--identities", type=int, default=None, help="identities per batch, 2 images each (8 / 16)")
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    ap.add_argument("--ekd-weight", type=float, default=1.0)
    ap.add_argument("--ekd-momentum", type=float, default=None, help="EKD threshold EMA momentum (default 0.01)")
    ap.add_argument("--calib-images", type=int, default=None, help="calibration images (quick 128, full 256)")
    ap.add_argument("--held-out", type=int, default=None, help="dev images for the cosine (quick 256, full 512)")
    ap.add_argument("--synthetic-n", type=int, default=None, help="synthetic images (quick 128, full 512)")
    ap.add_argument("--synthetic-steps", type=int, default=None,
                    help=f"BN-inversion steps per batch (default {SYNTH_STEPS})")
    ap.add_argument("--eval", default=None, type=lambda s: [x for x in s.split(",") if x and x != "none"],
                    help="comma list of pairs, dense (default: none in quick mode, pairs in full mode)")
    ap.add_argument("--threads", default="auto", help="torch threads, or auto (time 1 vs 2 on the teacher)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "efquant_bench",
                    help="synthetic images and evaluation features are cached here")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (60 if quick else 600)
    args.identities = args.identities or (8 if quick else 16)
    args.calib_images = args.calib_images or (128 if quick else 256)
    args.held_out = args.held_out or (256 if quick else 512)
    args.synthetic_n = args.synthetic_n or (128 if quick else 512)
    args.synthetic_steps = args.synthetic_steps or SYNTH_STEPS
    args.eval = args.eval if args.eval is not None else ([] if quick else ["pairs"])

    from efquant_fx.errors import EfquantError

    if not (args.shared / "data" / "lfw112" / "finetune.txt").is_file():
        print(f"error: real data not found under {args.shared} (set EFQUANT_SHARED)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        report = run(args)
    except EfquantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report["wall_s"]["total"] = round(time.perf_counter() - t0, 1)
    report["machine"] = machine()
    report["command"] = [sys.executable, *sys.argv] if argv is None else ["benchmarks/finetune.py", *argv]
    report["mode"] = "quick" if quick else "full"
    report["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print_table(report)
    print(f"\ntotal wall time {report['wall_s']['total']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
