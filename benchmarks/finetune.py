"""Issue 3: PTQ vs fine-tuned (KD) vs fine-tuned (KD + EKD) students of two real teachers on real LFW faces.

Teachers (``$EFQUANT_SHARED/models``, see its README): insightface MobileFaceNet y1 (MXNet, fp32,
MS1M-trained) and OpenCV Zoo SFace (ONNX; its weights already sit on an int8 *block* grid, so 8-bit
weight quantization is nearly lossless on it by construction). Data (``$EFQUANT_SHARED/data/lfw112``):

* calibration and fine-tuning: ``finetune.txt`` (6,181 images of 3,175 identities). Fine-tuning samples
  P identities x K=2 images per batch from the 705 identities with >= 2 images (3,711 images);
* validation for best-checkpoint selection: teacher-student embedding cosine on images of
  ``finetune.txt`` identities with a single image (never drawn by the fine-tune sampler, disjoint from
  the dev identities). The trainer evaluates it at step 0 (the PTQ student) and every ``eval_every``
  steps, and keeps the best weights, so fine-tuning cannot return something worse than PTQ on it;
* test: the dev identities (``dev_pairs.txt``, identity-disjoint from ``finetune.txt``). One embedding
  pass over the dev images gives (a) 3-fold pair accuracy on the 1,800 ``dev_pairs`` (insightface
  protocol, :func:`efquant_fx.eval.verification.verification_result`; the images are byte-identical to
  ``dev_pairs.bin``), (b) TAR@FAR=1e-3 on those pairs (:func:`efquant_fx.eval.metrics.tar_at_far`;
  with 900 impostor pairs this is TAR at zero false accepts) and (c) the dense protocol
  (:func:`efquant_fx.eval.dense.dense_tar_at_far`): every same-identity pair is genuine, every
  other pair an impostor, TAR at FAR 1e-3 and 1e-4. Full mode: all 3,321 dev images, flip-sum.
  ``--quick``: every 6th dev pair (300 pairs, 100 per fold, half same / half different) and only
  their images, no flip. Pair accuracy then moves in steps of 1/3 point, and pair TAR@FAR=1e-3 is TAR
  at zero false accepts over 150 impostor pairs: read the quick table for the direction, not decimals.

Rows per teacher: ``teacher``; ``ptq_w8a8``, ``kd_w8a8`` (fine-tuned, KD only: ``kd_cosine``),
``ekd_w8a8`` (KD + EKD, the Ef-QuantFace loss); the same at W4A4 (and W6A6 with ``--bits 8,6,4``).
Quantization: per-channel symmetric weights, per-tensor activations (percentile 99.99 observer),
BatchNorm kept unfolded (QuantFace). Fine-tune: AdamW, cosine LR with warm-up, BN statistics kept at
the teacher's, activation ranges learnable from their PTQ values, gradient clipping 5; both fine-tuned
rows of a bit width start from the same PTQ student and see the same batches.

W4A4 students keep some layers at 8 bit (``--w4-keep8``, recorded per row in the JSON):

* ``edges+dw`` (default): the first conv (stem), the last Linear (embedding head) and every
  depthwise conv (17 in MobileFaceNet, including the 7x7 GDC head) have 8-bit weights and 8-bit input
  activations. All 1x1 convs (most of the weights and MACs) have 4-bit weights and 4-bit inputs, and
  the PReLU / residual-add outputs that are not read by an 8-bit layer are 4-bit;
* ``edges``: only the stem and the embedding Linear at 8 bit;
* ``none``: everything at 4 bit.

What was tried for W4A4 on MobileFaceNet (PTQ, 128 calibration faces, teacher-student cosine on 64
validation faces, 2 shared CPU cores): keep8 ``none`` + percentile observer 0.036; ``edges`` +
percentile 0.033; ``edges+dw`` + percentile 0.660; ``edges+dw`` + MSE observer 0.403; ``edges+dw`` +
min-max observer 0.066. 4-bit inputs to the depthwise convs collapse the embedding; the percentile
observer (clipping the 0.01 % tail) matters as much. Fine-tuning LR: 1e-4 gave +0.05 cosine in 4 steps
from ``edges+dw`` PTQ; the default below 8 bit is 2e-4 with best-checkpoint selection; at 8 bit 2e-5
(SFace W8A8 lost cosine with 1e-4 in the quickstart).

The run also times one QAT training step against one float training step of the same model
(same batch, same loss, same optimizer, BN in eval, interleaved; median of ``--step-repeats``).

    python benchmarks/finetune.py --quick --threads 1    # both teachers, short fine-tunes, 300 dev pairs
    python benchmarks/finetune.py --threads 2            # full protocol, more steps

Prints a table; writes ``benchmarks/results/finetune.json`` (numbers, settings, machine, command line).
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads starve a shared machine
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, also when loaded by file path
from _common import SHARED_NOTE, default_shared, load_teacher, machine, write_json  # noqa: E402

from efquant_fx.graph.frozen import frozen_quantizers as fast_fake_quant  # noqa: E402  (the same numbers, faster)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "finetune.json"
KD = {"kd_cosine": {"weight": 1.0}}


# ----------------------------------------------------------------------------- layer rules


def layer_names(teacher) -> dict[str, list[str]]:
    """Conv/Linear module names in execution order: all convs, depthwise convs, linears."""
    from torch import nn

    from efquant_fx.graph.trace import trace

    gm = trace(copy.deepcopy(teacher))
    mods = dict(gm.named_modules())
    order = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    convs = [t for t in order if isinstance(mods[t], nn.Conv2d)]
    dw = [t for t in convs if mods[t].groups > 1 and mods[t].groups == mods[t].in_channels]
    linears = [t for t in order if isinstance(mods[t], nn.Linear)]
    return {"convs": convs, "depthwise": dw, "linears": linears}


def keep8_rule(names: dict[str, list[str]], keep: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Per-layer rules keeping layers at W8 (with 8-bit inputs) in a low-bit student, and their names."""
    if keep == "none":
        return [], []
    kept = [names["convs"][0], (names["linears"] or names["convs"])[-1]]
    if keep == "edges+dw":
        kept += [n for n in names["depthwise"] if n not in kept]
    rule = "^(" + "|".join(re.escape(n) for n in kept) + ")$"
    return [{"match": rule, "weight_bits": 8, "act_bits": 8}], kept


# ----------------------------------------------------------------------------- evaluation


def check_fast_path(model, images) -> float:
    """Min cosine between the Brevitas forward and the fast evaluation path on ``images``."""
    import torch

    with torch.no_grad():
        ref = model(images)
        with fast_fake_quant(model):
            fast = model(images)
    return float(torch.nn.functional.cosine_similarity(ref, fast).min())


class DevSet:
    """Dev images (identities of dev_pairs.txt) embedded once per model; pair and dense metrics."""

    def __init__(self, root: Path, stride: int, flip: bool):
        import numpy as np

        from efquant_fx.eval.images import ImageSet
        from efquant_fx.eval.pairs import lfw_identities, read_pairs

        pl = read_pairs(root / "dev_pairs.txt", root / "images")
        keep = list(range(0, len(pl.left), stride))
        left = [pl.left[i] for i in keep]
        right = [pl.right[i] for i in keep]
        if stride == 1:
            files = sorted(p for ident in lfw_identities(root / "dev_pairs.txt")
                           for p in (root / "images" / ident).glob("*.jpg"))
        else:
            files = sorted(set(left) | set(right))
        index = {p: i for i, p in enumerate(files)}
        self.left = np.array([index[p] for p in left])
        self.right = np.array([index[p] for p in right])
        self.issame = np.array([pl.issame[i] for i in keep], dtype=bool)
        names = sorted({p.parent.name for p in files})
        ids = {n: i for i, n in enumerate(names)}
        self.labels = np.array([ids[p.parent.name] for p in files])
        self.images = ImageSet.from_files(files)
        self.flip = flip
        counts = np.bincount(self.labels)
        self.info = {"pairs": len(keep), "pair_stride": stride, "images": len(files), "identities": len(names),
                     "flip": flip, "genuine_dense": int((counts * (counts - 1) // 2).sum()),
                     "impostor_dense": len(files) * (len(files) - 1) // 2 - int((counts * (counts - 1) // 2).sum())}

    def evaluate(self, model, cache: Path) -> dict[str, float]:
        import numpy as np

        from efquant_fx.eval.dense import dense_tar_at_far
        from efquant_fx.eval.embed import extract_embeddings, l2_normalize
        from efquant_fx.eval.metrics import pair_distances, tar_at_far
        from efquant_fx.eval.verification import verification_result

        with fast_fake_quant(model):
            feats = extract_embeddings(model, self.images, flip=self.flip, batch_size=64, cache=cache,
                                       progress=False)
        res = verification_result("dev_pairs", "lfw_bin", feats, self.left, self.right, self.issame,
                                  n_folds=3, flip=self.flip)
        emb = feats.sum(axis=1) if self.flip else feats[:, 0]
        dist = pair_distances(emb[self.left], emb[self.right])
        pair_tar = tar_at_far(-dist[self.issame], -dist[~self.issame], [1e-3])[1e-3]
        tars, _ = dense_tar_at_far(l2_normalize(emb).astype(np.float32), self.labels, [1e-4, 1e-3])
        return {"pair_acc": 100 * res.metrics["acc"], "pair_acc_std": 100 * res.metrics["acc_std"],
                "pair_tar_far1e-3": 100 * pair_tar, "dense_tar_far1e-3": 100 * tars[1e-3],
                "dense_tar_far1e-4": 100 * tars[1e-4]}


def list_images(root: Path) -> dict[str, list[Path]]:
    """finetune.txt as identity -> image paths."""
    out: dict[str, list[Path]] = {}
    for line in (root / "finetune.txt").read_text().splitlines():
        if line.strip():
            rel, ident = line.split("\t")[:2]
            out.setdefault(ident, []).append(root / rel)
    return out


def validation_images(root: Path, n: int):
    """``n`` images of finetune.txt identities with one image (the P x K sampler never draws them)."""
    import random

    import torch

    from efquant_fx.data.transforms import FaceTransform, decode_image

    singles = sorted(paths[0] for paths in list_images(root).values() if len(paths) == 1)
    random.Random(0).shuffle(singles)
    tf = FaceTransform(train=False)
    return torch.stack([tf(decode_image(p)) for p in singles[:n]])


# ----------------------------------------------------------------------------- step time


def step_times(teacher, qat_models: dict[str, Any], batch, labels, loss_spec: dict[str, Any], lr: float,
               repeats: int) -> dict[str, Any]:
    """Median seconds of one training step: float copy of the teacher vs each QAT student (interleaved)."""
    import torch

    from efquant_fx.finetune.losses import build_combined_loss
    from efquant_fx.finetune.trainer import set_train_mode

    models = {"float": copy.deepcopy(teacher), **{k: copy.deepcopy(m) for k, m in qat_models.items()}}
    state = {}
    for name, model in models.items():
        for p in model.parameters():
            p.requires_grad_(True)
        set_train_mode(model, "teacher")
        loss = build_combined_loss(loss_spec)
        params = [p for p in list(model.parameters()) + list(loss.parameters()) if p.requires_grad]
        state[name] = (model, loss, torch.optim.AdamW(params, lr=lr), params)
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(repeats + 1):
        for name, (model, loss, opt, params) in state.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                t_emb = teacher(batch)
            total, _ = loss(model(batch), t_emb, labels)
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": int(batch.shape[0]), "repeats": repeats, "median_s": {k: round(v, 3) for k, v in med.items()},
            "ratio_to_float": {k: round(med[k] / med["float"], 2) for k in qat_models}}


# ----------------------------------------------------------------------------- the run


def run_model(model_name: str, args: argparse.Namespace, dev: DevSet, report: dict[str, Any]) -> None:
    import torch

    from efquant_fx import compress
    from efquant_fx.finetune import fidelity_evaluator, finetune
    from efquant_fx.recipe import load_recipe

    root = args.shared / "data" / "lfw112"
    t_model = time.perf_counter()
    teacher = load_teacher(model_name, args.shared)
    names = layer_names(teacher)
    val = validation_images(root, args.val_images)
    fid = fidelity_evaluator(teacher, val)

    def val_eval(model):
        with fast_fake_quant(model):
            return fid(model)

    data = {"kind": "list", "list": str(root / "finetune.txt"), "root": str(root), "verify": "header"}
    steps = args.steps_sface if model_name == "sface" else args.steps
    pool = sum(len(v) for v in list_images(root).values() if len(v) >= 2)
    batch = args.identities * 2
    rows: dict[str, Any] = {}
    settings: dict[str, Any] = {"steps": steps, "batch": batch, "finetune_pool_images": pool,
                                "val_images": len(val), "depthwise_convs": len(names["depthwise"]),
                                "convs": len(names["convs"]), "bits": {}}

    t0 = time.perf_counter()
    rows["teacher"] = {"metrics": dev.evaluate(teacher, args.cache), "eval_s": round(time.perf_counter() - t0, 1),
                       "train_images": 0}
    print(f"  {model_name} teacher: {fmt_metrics(rows['teacher']['metrics'])}", flush=True)
    qat_for_timing: dict[str, Any] = {}
    for bits in args.bits:
        low = bits < 8
        rules, kept = keep8_rule(names, args.w4_keep8 if bits == 4 else "edges") if low else ([], [])
        quant = {"weight_bits": bits, "act_bits": bits, "observer": args.observer, "batchnorm": "keep",
                 "layers": rules}
        base = {"name": f"{model_name}_w{bits}a{bits}", "device": "cpu", "seed": 0, "quant": quant,
                "calibration": {"images": args.calib_images, "batch_size": 32, "data": data}}
        lr = args.lr_low if low else args.lr
        ft = {"data": {**data, "min_images_per_identity": 2}, "steps": steps, "identities_per_batch": args.identities,
              "images_per_identity": 2, "optimizer": "adamw", "lr": lr, "weight_decay": 0.0, "schedule": "cosine",
              "warmup_steps": max(1, steps // 10), "clip_grad_norm": 5.0, "batchnorm": "teacher",
              "calibrate_steps": 0, "eval_every": max(1, steps // args.evals), "checkpoint_every": 10**6}
        settings["bits"][bits] = {"quant": quant, "layers_kept_at_8_bit": kept, "lr": lr,
                                  "finetune": {k: v for k, v in ft.items() if k != "data"}}
        t0 = time.perf_counter()
        ptq = compress(teacher, base)
        ptq_wall = time.perf_counter() - t0
        fast_cos = check_fast_path(ptq.model, val[:16])
        row = {"wall_s": round(ptq_wall, 1), "train_images": 0, "fast_path_min_cosine": round(fast_cos, 6),
               "val_cosine": val_eval(ptq.model)["cosine_mean"]}
        t0 = time.perf_counter()
        row["metrics"] = dev.evaluate(ptq.model, args.cache)
        row["eval_s"] = round(time.perf_counter() - t0, 1)
        rows[f"ptq_w{bits}a{bits}"] = row
        print(f"  {model_name} ptq_w{bits}a{bits}: val cos {row['val_cosine']:.4f} {fmt_metrics(row['metrics'])}",
              flush=True)
        qat_for_timing[f"w{bits}a{bits}"] = ptq.model
        for variant, losses in (("kd", KD), ("ekd", {**KD, "ekd": {"weight": args.ekd_weight}})):
            if variant not in args.variants:
                continue
            res = copy.copy(ptq)
            res.model = copy.deepcopy(ptq.model)
            res.history, res.notes, res.timings = [], [], {}
            res.recipe = load_recipe({**base, "finetune": {**ft, "losses": losses}})
            torch.manual_seed(0)
            t0 = time.perf_counter()
            finetune(res, evaluator=val_eval, best_metric="cosine_mean", progress=False)
            ft_wall = time.perf_counter() - t0
            train = [h for h in res.history if h["kind"] == "train"]
            evals = [h for h in res.history if h["kind"] == "eval"]
            kept_note = next((n for n in res.notes if n.startswith("fine-tune: kept")), None)
            best = max(evals, key=lambda h: h["cosine_mean"])
            row = {"wall_s": round(ptq_wall + ft_wall, 1), "finetune_s": round(ft_wall, 1), "steps": len(train),
                   "train_images": len(train) * batch,
                   "images_per_s": round(len(train) * batch / sum(1 / h["images_per_s"] * batch for h in train), 2),
                   "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"],
                   "val_curve": [(h["step"], round(h["cosine_mean"], 4)) for h in evals],
                   "best_step": best["step"], "val_cosine": val_eval(res.model)["cosine_mean"],
                   "kept_note": kept_note, "fast_path_min_cosine": round(check_fast_path(res.model, val[:16]), 6)}
            if best["step"] == 0 and abs(row["val_cosine"] - best["cosine_mean"]) > 1e-4:
                row["warning"] = "PTQ was the best checkpoint but the returned student differs from it"
            t0 = time.perf_counter()
            row["metrics"] = dev.evaluate(res.model, args.cache)
            row["eval_s"] = round(time.perf_counter() - t0, 1)
            rows[f"{variant}_w{bits}a{bits}"] = row
            print(f"  {model_name} {variant}_w{bits}a{bits}: val {row['val_curve']} best step {row['best_step']}, "
                  f"{fmt_metrics(row['metrics'])} ft {ft_wall:.0f}s", flush=True)
    if args.step_repeats:
        from efquant_fx.data.transforms import FaceTransform, decode_image

        ids = [v[:2] for v in list_images(root).values() if len(v) >= 2][:args.identities]
        tf = FaceTransform(train=True)
        x = torch.stack([tf(decode_image(p)) for pair in ids for p in pair])
        y = torch.arange(len(ids)).repeat_interleave(2)
        settings["step_time"] = step_times(teacher, qat_for_timing, x, y, {**KD, "ekd": {"weight": args.ekd_weight}},
                                           args.lr, args.step_repeats)
        print(f"  {model_name} step time: {settings['step_time']}", flush=True)
    report["results"][model_name] = rows
    report["settings"][model_name] = settings
    report["wall_s"][model_name] = round(time.perf_counter() - t_model, 1)


def fmt_metrics(m: dict[str, float]) -> str:
    return (f"acc {m['pair_acc']:.2f} pairTAR@1e-3 {m['pair_tar_far1e-3']:.2f} "
            f"dense TAR@1e-3 {m['dense_tar_far1e-3']:.2f} @1e-4 {m['dense_tar_far1e-4']:.2f}")


def markdown_table(report: dict[str, Any]) -> str:
    head = ("| teacher | student | pair acc % | pair TAR@FAR=1e-3 % | dense TAR@FAR=1e-3 % | dense TAR@FAR=1e-4 % "
            "| val cos | train images | wall s | train img/s |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model_name, rows in report["results"].items():
        for name, r in rows.items():
            m = r["metrics"]
            cells = [model_name, name, f"{m['pair_acc']:.2f} ± {m['pair_acc_std']:.2f}", f"{m['pair_tar_far1e-3']:.2f}",
                     f"{m['dense_tar_far1e-3']:.2f}", f"{m['dense_tar_far1e-4']:.2f}",
                     f"{r['val_cosine']:.4f}" if "val_cosine" in r else "1", str(r.get("train_images", 0)),
                     str(r.get("wall_s", "")), str(r.get("images_per_s", ""))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps, a third of the dev pairs, no flip (~20 min)")
    ap.add_argument("--shared", type=Path, default=default_shared(), help="EFQUANT_SHARED (default ../shared)")
    ap.add_argument("--models", default="mobilefacenet,sface", type=lambda s: s.split(","),
                    help="comma list: mobilefacenet, sface")
    ap.add_argument("--bits", default="8,4", type=lambda s: [int(b) for b in s.split(",")],
                    help="comma list of WnAn students (8, 6, 4)")
    ap.add_argument("--variants", default="kd,ekd", type=lambda s: s.split(","),
                    help="fine-tuned rows: kd (KD only), ekd (KD + EKD)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tune steps, MobileFaceNet (quick 30, full 400)")
    ap.add_argument("--steps-sface", type=int, default=None, help="fine-tune steps, SFace (quick 12, full 400)")
    ap.add_argument("--evals", type=int, default=None, help="validation evaluations per fine-tune (quick 3, full 8)")
    ap.add_argument("--identities", type=int, default=8, help="identities per batch, 2 images each")
    ap.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate at 8 bit")
    ap.add_argument("--lr-low", type=float, default=2e-4, help="AdamW learning rate below 8 bit")
    ap.add_argument("--ekd-weight", type=float, default=1.0)
    ap.add_argument("--observer", default="percentile", help="activation observer (minmax, percentile, mse)")
    ap.add_argument("--w4-keep8", default="edges+dw", choices=["none", "edges", "edges+dw"],
                    help="layers kept at 8 bit in the W4A4 student")
    ap.add_argument("--calib-images", type=int, default=128)
    ap.add_argument("--val-images", type=int, default=None, help="validation images (quick 48, full 256)")
    ap.add_argument("--pair-stride", type=int, default=None, help="use every n-th dev pair (quick 6, full 1)")
    ap.add_argument("--step-repeats", type=int, default=3, help="QAT vs float step timing repeats (0: skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "efquant_bench" / "features",
                    help="evaluation features are cached here")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (30 if quick else 400)
    args.steps_sface = args.steps_sface or (12 if quick else 400)
    args.evals = args.evals or (3 if quick else 8)
    args.val_images = args.val_images or (48 if quick else 256)
    args.pair_stride = args.pair_stride or (6 if quick else 1)

    if not (args.shared / "data" / "lfw112" / "finetune.txt").is_file():
        print(f"error: real data not found under {args.shared} (set EFQUANT_SHARED)", file=sys.stderr)
        return 2
    import torch

    from efquant_fx.errors import EfquantError

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    dev = DevSet(args.shared / "data" / "lfw112", args.pair_stride, flip=not quick)
    report: dict[str, Any] = {"results": {}, "settings": {}, "wall_s": {}, "dev": dev.info,
                              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}

    def write() -> None:  # after every teacher, so a cut-short run keeps what it finished
        report["wall_s"]["total"] = round(time.perf_counter() - t0, 1)
        report["machine"] = {**machine(), "shared": SHARED_NOTE}
        report["command"] = [sys.executable, *sys.argv] if argv is None else ["benchmarks/finetune.py", *argv]
        report["mode"] = "quick" if quick else "full"
        report["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        report["table_md"] = markdown_table(report)
        write_json(args.out, report)

    try:
        for model_name in args.models:
            run_model(model_name, args, dev, report)
            write()
    except EfquantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n" + report["table_md"])
    print(f"\ntotal wall time {report['wall_s']['total']:.0f} s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
