"""Head-to-head: efquant-fx against torch.ao PTQ, Brevitas PTQ and QuantFace-style QAT (issue 7).

One teacher, one machine, one run, the same real data for every row:

* teacher: insightface MobileFaceNet y1 (``$EFQUANT_SHARED/models/insightface_mobilefacenet_y1``);
  ``--models mobilefacenet,sface`` adds OpenCV SFace;
* calibration and fine-tuning: ``lfw112/finetune.txt`` (6,181 images of 3,175 identities, LFW folds
  4-7 + identities in no pair); the pool sizes 1,400 / 3,000 / 6,181 are what the P x K sampler
  draws from (seeded identity-whole subsets, ``finetune.data.max_images``); every fine-tuned row
  takes the same number of steps;
* evaluation: ``lfw112/dev_pairs.bin`` (LFW folds 1-3, identity-disjoint from the fine-tuning set),
  insightface protocol (3 contiguous folds, threshold chosen on the other folds). Full mode: all
  1,800 pairs with flip-sum. ``--quick``: the first ``--pairs-per-fold`` pairs of each fold, half
  genuine and half impostor, no flip (CPU time). TAR@FAR=1e-3 is computed on the same pairs: with
  900 (full) or 45 (quick) impostor pairs it is the TAR above the highest impostor score.

Rows (recipes for ours and the QuantFace-style rows under ``efquant_fx/recipes/bench/``):

====================  =========================================================================
teacher               float model
torchao_w8a8          torch.ao FX PTQ, ``get_default_qconfig_mapping("x86")`` as shipped
torchao_w8a8_fprelu   same, PReLU kept float (torch 2.13 ``quantized::prelu`` per-channel bug)
brevitas_w8a8/_w4a4   ``brevitas.graph.quantize.quantize`` + ``calibration_mode``, Brevitas's
                      default quantizers (4-bit row: same quantizers, bit widths set to 4)
ours_ptq_w8a8/_w4a4   efquant-fx PTQ (efquant_fx/recipes/bench/ours_ptq_*.yaml)
quantface_w8a8/_w4a4  QuantFace-style QAT: all layers at the bit width, min/max ranges, BN in train
                      mode, SGD-Nesterov at QuantFace's LR scaled to the batch, MSE embedding KD only
ours_ft_w8a8_<pool>   KD + EKD fine-tune on pools of 1,400 / 3,000 / 6,181 images
ours_ft_w4a4          KD + EKD, all 6,181 (stem/head at 8 bit, asymmetric 4-bit activations)
ours_ft_w4a4_dw8      same with the depthwise convs at 8 bit too (mixed precision, not in the checks)
ours_df_w8a8          data-free: calibration and fine-tune on BN-inversion images from the teacher
prune30_ft/prune50_ft global magnitude pruning (30 % / 50 % of conv+linear weights), then KD + EKD
====================  =========================================================================

    python benchmarks/compare.py --quick --threads 1   # < 15 min on 2 shared CPU cores
    python benchmarks/compare.py --device cuda         # full: GPU (see docs/benchmarks.md)

Prints a markdown table and writes ``benchmarks/results/compare.json`` (rows, checks, settings,
machine, command line).
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads starve a shared machine
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, also when loaded by file path
from _common import default_shared, load_teacher, machine, state_dict_bytes, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "efquant_fx" / "recipes" / "bench"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "compare.json"

# key -> (label, bits, family, recipe file or None, pool images or None)
ROWS: dict[str, tuple[str, str, str, str | None, int | None]] = {
    "teacher": ("teacher (float)", "fp32", "reference", None, None),
    "torchao_w8a8": ("torch.ao FX PTQ, x86 default qconfig", "W8A8", "baseline", None, None),
    "torchao_w8a8_fprelu": ("torch.ao FX PTQ, x86 default, PReLU float", "W8A8", "baseline", None, None),
    "brevitas_w8a8": ("Brevitas PTQ, defaults", "W8A8", "baseline", None, None),
    "quantface_w8a8": ("QuantFace-style QAT (MSE KD), all images", "W8A8", "baseline", "quantface_w8a8.yaml", None),
    "ours_ptq_w8a8": ("ours PTQ", "W8A8", "ours", "ours_ptq_w8a8.yaml", None),
    "ours_ft_w8a8_1400": ("ours KD+EKD, pool 1,400", "W8A8", "ours", "ours_ft_w8a8.yaml", 1400),
    "ours_ft_w8a8_3000": ("ours KD+EKD, pool 3,000", "W8A8", "ours", "ours_ft_w8a8.yaml", 3000),
    "ours_ft_w8a8": ("ours KD+EKD, all 6,181", "W8A8", "ours", "ours_ft_w8a8.yaml", None),
    "ours_df_w8a8": ("ours KD+EKD, data-free", "W8A8", "ours", "ours_df_w8a8.yaml", None),
    "brevitas_w4a4": ("Brevitas PTQ, defaults at 4 bit", "W4A4", "baseline", None, None),
    "quantface_w4a4": ("QuantFace-style QAT (MSE KD), all images", "W4A4", "baseline", "quantface_w4a4.yaml", None),
    "ours_ptq_w4a4": ("ours PTQ", "W4A4", "ours", "ours_ptq_w4a4.yaml", None),
    "ours_ft_w4a4": ("ours KD+EKD, all 6,181", "W4A4", "ours", "ours_ft_w4a4.yaml", None),
    "ours_ft_w4a4_dw8": ("ours KD+EKD, depthwise at 8 bit (mixed)", "W4A4+dw8", "ours", "ours_ft_w4a4_dw8.yaml",
                         None),
    "prune30_ft": ("magnitude pruning 30 % + KD+EKD", "fp32", "ours", "prune30_ft.yaml", None),
    "prune50_ft": ("magnitude pruning 50 % + KD+EKD", "fp32", "ours", "prune50_ft.yaml", None),
}
BASELINES = {"W8A8": ["torchao_w8a8", "torchao_w8a8_fprelu", "brevitas_w8a8", "quantface_w8a8"],
             "W4A4": ["brevitas_w4a4", "quantface_w4a4"]}
FAR = 1e-3


def depthwise_rule(teacher) -> str:
    """Regex naming every grouped (depthwise) Conv2d."""
    import re

    from torch import nn

    names = [n for n, m in teacher.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    return f"^({'|'.join(re.escape(n) for n in names)})$" if names else "^$"


def edge_layers_rule(teacher) -> str:
    """Regex naming the first Conv2d and the last Linear in execution order (kept at 8 bit below 8 bits)."""
    import re

    from torch import nn

    from efquant_fx.graph.trace import trace

    gm = trace(copy.deepcopy(teacher))
    order = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    types = {name: type(m) for name, m in gm.named_modules()}
    convs = [t for t in order if issubclass(types[t], nn.Conv2d)]
    linears = [t for t in order if issubclass(types[t], nn.Linear)] or convs
    return f"^({re.escape(convs[0])}|{re.escape(linears[-1])})$"


def pick_threads(teacher, requested: str) -> int:
    """``auto``: time the teacher on 1 and 2 threads and keep the faster (on a shared machine two
    OpenMP threads can be slower than one); otherwise the given number."""
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


# ------------------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory of one row: CUDA ``max_memory_allocated``, or on Linux the process's peak RSS
    (``VmHWM``, reset to the current RSS through ``/proc/self/clear_refs``; ``start_mb`` is the RSS when
    the row began, as freed memory is seldom returned to the OS); elsewhere ``ru_maxrss`` (never reset)."""

    def __init__(self, device: str):
        import torch

        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.kind = "cuda_max_allocated" if self.cuda else "rss_peak"
        self.start_mb = 0.0

    def __enter__(self) -> PeakMemory:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start_mb = torch.cuda.memory_allocated() / 2**20
        else:
            self.start_mb = self._status("VmRSS:") or 0.0
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.kind = "ru_maxrss_process"
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.cuda:
            self.mb = torch.cuda.max_memory_allocated() / 2**20
            return
        self.mb = self._status("VmHWM:") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    @staticmethod
    def _status(field: str) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None


# ------------------------------------------------------------------------------------- evaluation


class PairSubset:
    """The dev pairs of ``dev_pairs.bin``: all of them, or the first ``per_fold`` of each of the 3
    folds (half genuine, half impostor; each LFW fold is 300 genuine then 300 impostor pairs)."""

    def __init__(self, path: Path, per_fold: int | None, flip: bool):
        import numpy as np

        from efquant_fx.eval.images import ImageSet
        from efquant_fx.eval.safe_pickle import parse_verification_bin

        data = path.read_bytes()
        bins, issame = parse_verification_bin(data, source=str(path))
        issame = np.asarray(issame, dtype=bool)
        n_folds, fold = 3, len(issame) // 3
        if per_fold is None or per_fold >= fold:
            pairs = list(range(len(issame)))
        else:
            half = per_fold // 2
            pairs = []
            for f in range(n_folds):
                idx = np.arange(f * fold, (f + 1) * fold)
                pairs += idx[issame[idx]][:half].tolist() + idx[~issame[idx]][: per_fold - half].tolist()
        self.pairs = pairs
        self.issame = issame[pairs]
        self.flip = flip
        self.n_folds = n_folds
        items = [bins[2 * p + s] for p in pairs for s in (0, 1)]
        names = [f"{path}[image {2 * p + s}]" for p in pairs for s in (0, 1)]
        self.images = ImageSet(items, names)

    def embed(self, model, device: str, cache: Path | None):
        from efquant_fx.eval.embed import extract_embeddings

        return extract_embeddings(model, self.images, flip=self.flip, device=device, batch_size=64,
                                  cache=cache, progress=False, description="dev pairs")

    def score(self, feats, teacher_feats=None) -> dict[str, Any]:
        import numpy as np

        from efquant_fx.eval.metrics import pair_distances, tar_at_far
        from efquant_fx.eval.verification import verification_result

        idx = np.arange(len(self.pairs))
        res = verification_result("lfw_dev", "bin", feats, 2 * idx, 2 * idx + 1, self.issame,
                                  n_folds=self.n_folds, flip=self.flip)
        emb = feats.sum(axis=1) if self.flip else feats[:, 0]
        score = -pair_distances(emb[2 * idx], emb[2 * idx + 1])
        tar = tar_at_far(score[self.issame], score[~self.issame], [FAR])[FAR]
        out = {"acc": res.metrics["acc"], "acc_std": res.metrics["acc_std"], "auc": res.metrics.get("auc"),
               "fold_acc": res.info["fold_accuracies"], "tar_at_far_1e-3": tar, "pairs": len(self.pairs)}
        if teacher_feats is not None:  # teacher-student embedding cosine on the same (un-flipped) images
            a, b = teacher_feats[:, 0], feats[:, 0]
            cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
            out["cosine_to_teacher"] = float(cos.mean())
        return out


class Plain:
    """Wraps a model whose output may be a Brevitas QuantTensor so that it returns a float tensor."""

    def __new__(cls, model):
        import torch

        class _Plain(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                y = self.inner(x)
                return y.value if hasattr(y, "value") else y

        return _Plain(model)


# ------------------------------------------------------------------------------------- rows


def brevitas_default_ptq(teacher, batches, bits: int, device: str):
    """``preprocess_for_quantize`` + ``quantize`` with Brevitas's default maps, then ``calibration_mode``.

    At 4 bits the same default quantizer classes are used with ``weight_bit_width``/``bit_width`` 4.
    """
    import warnings

    import torch
    from brevitas.graph import quantize as bq
    from brevitas.graph.calibrate import calibration_mode

    def with_bits(table: dict, key: str) -> dict:
        out = {}
        for k, v in table.items():
            if v is None or bits == 8:
                out[k] = v
            else:
                cls, kwargs = v
                out[k] = (cls, {**kwargs, key: bits})
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = bq.preprocess_for_quantize(copy.deepcopy(teacher).cpu().eval())
        q = bq.quantize(model, quant_identity_map=with_bits(bq.QUANT_IDENTITY_MAP, "bit_width"),
                        compute_layer_map=with_bits(bq.COMPUTE_LAYER_MAP, "weight_bit_width"),
                        quant_act_map=with_bits(bq.QUANT_ACT_MAP, "bit_width"))
        q = q.to(device).eval()
        with torch.no_grad(), calibration_mode(q):
            for x in batches:
                q(x.to(device))
    return Plain(q).eval()


def pruned_size(model) -> tuple[int, float]:
    """(fp32 bytes of the dense model, fraction of conv/linear weights that are non-zero); pruning masks
    (``weight_mask`` buffers of ``torch.nn.utils.prune``) are not counted as model bytes."""
    import torch

    total, nz, numel = 0, 0, 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d | torch.nn.Linear):
            w = mod.weight
            numel += w.numel()
            nz += int((w != 0).sum())
    for name, b in model.named_buffers():
        if b.is_floating_point() and not name.endswith("weight_mask"):
            total += b.numel() * b.element_size()
    return total, nz / max(numel, 1)


def recipe_spec(key: str, args: argparse.Namespace, rules: list[str], model_name: str) -> dict[str, Any]:
    """The row's recipe (``efquant_fx/recipes/bench/``) with this run's data, device and (quick) schedule."""
    from efquant_fx.recipe import load_recipe

    _, _, _, file, pool = ROWS[key]
    spec = load_recipe(BENCH / file).to_dict()
    spec["name"] = f"{model_name}_{key}"
    spec["device"] = args.device
    spec["model"] = {"name": None, "weights": None, "leaf_modules": [], "kwargs": {}}
    spec["calibration"]["images"] = args.calib_images
    spec["calibration"]["batch_size"] = args.calib_batch
    if spec["calibration"]["data"]["kind"] == "synthetic":
        spec["calibration"]["data"].update(n=args.synthetic_n, cache=str(args.cache / "synthetic"))
    q = spec.get("quant")
    for layer, rule in zip((q or {}).get("layers", []), rules, strict=False):
        layer["match"] = rule  # the 8-bit stem/head (and depthwise) rules, found for this teacher
    ft = spec.get("finetune")
    if ft:
        ft["steps"] = args.steps
        ft["identities_per_batch"] = args.identities
        ft["images_per_identity"] = 2
        if ft["warmup_steps"]:
            ft["warmup_steps"] = max(1, args.steps // 20)
        if ft["optimizer"] == "sgd":  # QuantFace: lr 0.1 at a global batch of 512, scaled linearly
            ft["lr"] = 0.1 * args.identities * 2 / 512
        if ft["data"]["kind"] == "synthetic":
            ft["data"].update(n=args.synthetic_n, cache=str(args.cache / "synthetic"))
        elif pool is not None:
            ft["data"]["max_images"] = pool
        ft["checkpoint_every"] = 10**6
        if ft.get("eval_every"):
            ft["eval_every"] = min(ft["eval_every"], args.steps)
    return spec


def run_row(key: str, teacher, args, rules: list[str], model_name: str, calib_batches) -> dict[str, Any]:
    """Build one row's model; returns the model and what it cost (no accuracy yet)."""
    from efquant_fx import compress
    from efquant_fx.graph.report import float_size_bytes

    row: dict[str, Any] = {"label": ROWS[key][0], "bits": ROWS[key][1], "family": ROWS[key][2]}
    t0 = time.perf_counter()
    if key == "teacher":
        model, row["size_bytes"] = teacher, float_size_bytes(teacher)
    elif key.startswith("torchao"):
        from baselines import default_ptq

        model = default_ptq(teacher, calib_batches, engine="x86", keep_prelu_float=key.endswith("fprelu"))
        row["size_bytes"] = state_dict_bytes(model)
        row["device"] = "cpu"  # int8 CPU kernels
        row["notes"] = ["size: serialized int8 state dict (packed weights + float PReLU/BN leftovers)"]
    elif key.startswith("brevitas"):
        from efquant_fx.graph.report import compressed_size_bytes

        model = brevitas_default_ptq(teacher, calib_batches, 4 if key.endswith("w4a4") else 8, args.device)
        row["size_bytes"] = compressed_size_bytes(model)
    else:
        spec = recipe_spec(key, args, rules, model_name)
        row["recipe"] = f"efquant_fx/recipes/bench/{ROWS[key][3]}"
        row["resolved_recipe"] = spec
        result = compress(teacher, spec)
        model = result.model
        row["timings_s"] = {k: round(v, 1) for k, v in result.timings.items()}
        row["notes"] = list(result.notes)
        if spec.get("prune"):
            row["size_bytes"], row["nonzero_fraction"] = pruned_size(model)
        else:
            row["size_bytes"] = result.size_bytes_after
        train = [h for h in result.history if h["kind"] == "train"]
        if train:
            ft_s = result.timings.get("finetune", 0.0)
            batch = spec["finetune"]["identities_per_batch"] * spec["finetune"]["images_per_identity"]
            row.update(steps=len(train), batch=batch, finetune_s=round(ft_s, 1),
                       images_per_s=round(len(train) * batch / max(ft_s, 1e-9), 2),
                       first_loss=train[0]["loss"], last_loss=train[-1]["loss"])
            kept = [n for n in result.notes if n.startswith("fine-tune: kept the best evaluated weights, step ")]
            if kept:  # the trainer restored earlier weights (best teacher-student cosine on fine-tune images)
                row["kept_step"] = int(kept[0].split("step ")[1].split()[0])
    row["build_s"] = round(time.perf_counter() - t0, 1)
    return {"model": model, "row": row}


# ------------------------------------------------------------------------------------- driver


def calibration_batches(shared: Path, n: int, batch: int):
    """The seeded calibration images every PTQ baseline sees (what ``compress`` draws for its recipes)."""
    from efquant_fx.data.calibration import calibration_batches as draw
    from efquant_fx.recipe import DataSpec

    root = shared / "data" / "lfw112"
    spec = DataSpec(kind="list", list=str(root / "finetune.txt"), root=str(root), verify="header")
    return draw(spec, n, batch, seed=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    os.environ.setdefault("EFQUANT_SHARED", str(args.shared))
    evalset = PairSubset(args.shared / "data" / "lfw112" / "dev_pairs.bin", args.pairs_per_fold, args.flip)
    report: dict[str, Any] = {"results": {}, "checks": {}, "settings": {}, "wall_s": {}}
    for model_name in args.models:
        t_model = time.perf_counter()
        teacher = load_teacher(model_name, args.shared).to(args.device)
        report["threads"] = pick_threads(teacher, args.threads) if args.device == "cpu" else torch.get_num_threads()
        rules = [edge_layers_rule(teacher), depthwise_rule(teacher)]
        calib = calibration_batches(args.shared, args.calib_images, args.calib_batch)
        rows: dict[str, Any] = {}
        teacher_feats = None
        for key in ROWS:
            if args.only and key not in args.only and key != "teacher":
                continue
            t0 = time.perf_counter()
            with PeakMemory(args.device) as mem:
                built = run_row(key, teacher, args, rules, model_name, calib)
                row, model = built["row"], built["model"]
                t_eval = time.perf_counter()
                device = row.get("device", args.device)
                # only the teacher's features are cached: efquant_fx.eval.embed.model_hash sees the state dict
                # (and FX code), which is the same for Brevitas models that differ only in bit width
                feats = evalset.embed(model, device, args.cache / "features" if key == "teacher" else None)
                row.update(evalset.score(feats, teacher_feats))
                row["eval_s"] = round(time.perf_counter() - t_eval, 1)
            if key == "teacher":
                teacher_feats = feats
            row["peak_mb"] = round(mem.mb, 1)
            row["start_mb"] = round(mem.start_mb, 1)
            row["peak_kind"] = mem.kind
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            rows[key] = row
            print(f"  {model_name} {key}: acc {100 * row['acc']:.2f} ± {100 * row['acc_std']:.2f}, "
                  f"TAR@1e-3 {100 * row['tar_at_far_1e-3']:.1f}, cos {row.get('cosine_to_teacher', 1):.3f}, "
                  f"{row['wall_s']:.0f} s", flush=True)
            del built, model
        base = rows["teacher"]
        for row in rows.values():
            row["delta_acc"] = row["acc"] - base["acc"]
            row["size_ratio"] = row["size_bytes"] / base["size_bytes"]
        report["results"][model_name] = rows
        report["checks"][model_name] = checks(rows)
        report["settings"][model_name] = {"edge_layers_at_8_bit": rules[0], "depthwise": rules[1],
                                          "eval_pairs": len(evalset.pairs), "synthetic_images": args.synthetic_n,
                                          "flip": args.flip, "calibration_images": args.calib_images,
                                          "calibration_batch": args.calib_batch, "steps": args.steps,
                                          "batch": args.identities * 2}
        report["wall_s"][model_name] = round(time.perf_counter() - t_model, 1)
    return report


def checks(rows: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 7's acceptance checks, with the margin in accuracy points (positive = ours ahead)."""
    out = []
    for ours, bits in (("ours_ft_w8a8", "W8A8"), ("ours_ft_w4a4", "W4A4")):
        if ours not in rows:
            continue
        for base in BASELINES[bits]:
            if base not in rows:
                continue
            margin = rows[ours]["acc"] - rows[base]["acc"]
            strict = bits == "W4A4"  # W8A8: "at least as accurate"; W4A4: "beats"
            out.append({"ours": ours, "baseline": base, "bits": bits, "margin_points": round(100 * margin, 3),
                        "rule": ">" if strict else ">=", "pass": bool(margin > 0 if strict else margin >= 0),
                        "tar_margin_points": round(100 * (rows[ours]["tar_at_far_1e-3"]
                                                          - rows[base]["tar_at_far_1e-3"]), 3)})
    return out


def markdown_table(report: dict[str, Any]) -> str:
    lines = []
    for model_name, rows in report["results"].items():
        lines.append(f"**{model_name}** ({report['settings'][model_name]['eval_pairs']} dev pairs)\n")
        lines.append("| row | bits | pair acc % (mean ± std, 3 folds) | TAR@FAR=1e-3 % | Δ acc vs teacher (pts) "
                     "| cos to teacher | size MB (× fp32) | fine-tune s | img/s | peak MB (+ over row start) |")
        lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for key, r in rows.items():
            size = f"{r['size_bytes'] / 1e6:.2f} ({r['size_ratio']:.3f}×)"
            if "nonzero_fraction" in r:
                size += f", {100 * r['nonzero_fraction']:.0f} % nz"
            ft = f"{r['finetune_s']:.0f} ({r['steps']} steps" if "finetune_s" in r else f"— (build {r['build_s']:.0f})"
            if "finetune_s" in r:
                ft += f"; step {r['kept_step']} kept)" if "kept_step" in r else ")"
            lines.append(
                f"| {r['label']} (`{key}`) | {r['bits']} | {100 * r['acc']:.2f} ± {100 * r['acc_std']:.2f} "
                f"| {100 * r['tar_at_far_1e-3']:.1f} | {100 * r['delta_acc']:+.2f} "
                f"| {r.get('cosine_to_teacher', 1.0):.3f} | {size} | {ft} "
                f"| {r['images_per_s'] if 'images_per_s' in r else '—'} "
                f"| {r['peak_mb']:.0f} (+{max(r['peak_mb'] - r.get('start_mb', r['peak_mb']), 0):.0f}) |")
        lines.append("")
        for c in report["checks"][model_name]:
            lines.append(f"- `{c['ours']}` {c['rule']} `{c['baseline']}` ({c['bits']}): "
                         f"{'PASS' if c['pass'] else 'FAIL'}, margin {c['margin_points']:+.2f} pts "
                         f"(TAR@1e-3 {c['tar_margin_points']:+.1f} pts)")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few steps, pair subset, no flip: < 15 min on 2 CPU cores")
    ap.add_argument("--shared", type=Path, default=default_shared(), help="EFQUANT_SHARED (default ../shared)")
    ap.add_argument("--models", default="mobilefacenet", type=lambda s: s.split(","),
                    help="comma list: mobilefacenet, sface")
    ap.add_argument("--only", type=lambda s: s.split(","), default=None,
                    help=f"comma list of rows ({', '.join(ROWS)}); the teacher always runs")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (torch.ao int8 rows always run on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tune steps, every fine-tuned row (quick 6, full 600)")
    ap.add_argument("--identities", type=int, default=None, 
                    help="identities per batch, 2 images each (quick 4, full 16)")
    ap.add_argument("--calib-images", type=int, default=None, help="calibration images (quick 32, full 256)")
    ap.add_argument("--calib-batch", type=int, default=None, help="calibration batch (quick 16, full 32)")
    ap.add_argument("--synthetic-n", type=int, default=None, help="data-free images (quick 16, full 512)")
    ap.add_argument("--pairs-per-fold", type=int, default=None,
                    help="dev pairs per fold, half genuine (quick 30, full all 600)")
    ap.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                    help="flip-sum embeddings (full mode default; off in quick)")
    ap.add_argument("--threads", default="auto", help="torch threads, or auto (time 1 vs 2 on the teacher)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "efquant_bench",
                    help="synthetic images and evaluation pixels/features are cached here")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (6 if quick else 600)
    args.identities = args.identities or (4 if quick else 16)
    args.calib_images = args.calib_images or (32 if quick else 256)
    args.calib_batch = args.calib_batch or (16 if quick else 32)
    args.synthetic_n = args.synthetic_n or (16 if quick else 512)
    args.pairs_per_fold = args.pairs_per_fold or (30 if quick else None)
    args.flip = (not quick) if args.flip is None else args.flip
    unknown = [k for k in args.only or [] if k not in ROWS]
    if unknown:
        print(f"error: --only: unknown rows {unknown} (known: {', '.join(ROWS)})", file=sys.stderr)
        return 2
    if not (args.shared / "data" / "lfw112" / "dev_pairs.bin").is_file():
        print(f"error: real data not found under {args.shared} (set EFQUANT_SHARED or --shared)", file=sys.stderr)
        return 2

    from efquant_fx.errors import EfquantError

    t0 = time.perf_counter()
    try:
        report = run(args)
    except EfquantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report["wall_s"]["total"] = round(time.perf_counter() - t0, 1)
    report["machine"] = machine()
    report["command"] = [Path(sys.executable).name, *sys.argv] if argv is None else ["benchmarks/compare.py", *argv]
    report["mode"] = "quick" if quick else "full"
    report["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report["table_md"] = markdown_table(report)
    print("\n" + report["table_md"])
    print(f"total wall time {report['wall_s']['total']:.0f} s")
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
