"""Issue 15: speed and memory on 2 CPU cores, measured in one process with the variants interleaved.

Rows (MobileFaceNet-y1 from ``$EFQUANT_SHARED/models``, or the zoo ``mobilefacenet`` with random
weights when the shared folder is absent, which ``teacher`` in the JSON says):

* ``embed``: seconds to embed ``--images`` faces (batch 64, inference): float teacher, the W8A8
  fake-quant student through Brevitas's forward, and through :func:`efquant_fx.graph.frozen.frozen_quantizers`
  (what ``efquant-fx eval`` uses); median of ``--repeats`` interleaved rounds;
* ``train_step``: one training step (batch 64, KD cosine loss, AdamW, BN in eval) of the float model
  and of the W4A4 QAT student, interleaved, median; the student through the fused fake-quant path the
  fine-tuner uses (:func:`efquant_fx.graph.fakequant.fast_fake_quant`) and through Brevitas's forward;
* ``cli_help``: wall time of ``efquant-fx --help`` in a fresh process;
* ``apply``: peak resident memory (child process) and wall time of ``efquant-fx apply
  recipes/mobilefacenet_w8a8.yaml`` on the real teacher and ``finetune.txt`` (``--skip-apply`` skips it).

    python benchmarks/speed.py            # prints a table; writes benchmarks/results/speed.json
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_NOTE, default_shared, load_teacher, machine, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "speed.json"
MXNET = Path("models") / "insightface_mobilefacenet_y1" / "model-symbol.json"


def teacher_and_images(shared: Path, n: int):
    import torch

    from efquant_fx import create_model

    if (shared / MXNET).is_file():
        teacher, name = load_teacher("mobilefacenet", shared), "MobileFaceNet-y1 (real weights)"
    else:
        teacher, name = create_model("mobilefacenet").eval(), "mobilefacenet zoo (random weights)"
    images = torch.rand(n, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return teacher, name, images


def students(teacher, images):
    from efquant_fx import compress

    base = {"device": "cpu", "calibration": {"images": 64, "batch_size": 32}}
    w8 = compress(teacher, {**base, "quant": {"observer": "percentile"}}, calibration_data=images[:64]).model
    w4a4 = compress(teacher, {**base, "quant": {"weight_bits": 4, "act_bits": 4, "observer": "percentile"}},
                    calibration_data=images[:64]).model
    return w8, w4a4


def interleaved(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def embed_times(teacher, w8, images, repeats: int) -> dict[str, float]:
    import torch

    from efquant_fx.graph.frozen import frozen_quantizers

    def run(model, frozen: bool):
        def go():
            with torch.no_grad():
                for start in range(0, len(images), 64):
                    if frozen:
                        with frozen_quantizers(model):
                            model(images[start:start + 64])
                    else:
                        model(images[start:start + 64])
        return go

    return interleaved({"float": run(teacher, False), "w8a8_brevitas": run(w8, False),
                        "w8a8_frozen": run(w8, True)}, repeats)


def step_times(teacher, qat, images, repeats: int) -> dict[str, float]:
    import contextlib

    import torch

    from efquant_fx.finetune.losses import build_combined_loss
    from efquant_fx.finetune.runtime import set_train_mode
    from efquant_fx.graph.fakequant import fast_fake_quant

    batch = images[:64]
    with torch.no_grad():
        target = teacher(batch)
    fns = {}
    variants = (("float", teacher, False), ("w4a4_qat", qat, True), ("w4a4_qat_brevitas", qat, False))
    for name, source, fused in variants:
        model = copy.deepcopy(source)
        for p in model.parameters():
            p.requires_grad_(True)
        set_train_mode(model, "teacher")
        loss = build_combined_loss({"kd_cosine": {"weight": 1.0}})
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step(model=model, loss=loss, opt=opt, fused=fused):
            with fast_fake_quant(model) if fused else contextlib.nullcontext():  # what the trainer does
                total, _ = loss(model(batch), target, None)
                opt.zero_grad(set_to_none=True)
                total.backward()
            opt.step()
        fns[name] = step
    return interleaved(fns, repeats)


def cli_help_s() -> float:
    exe = Path(sys.executable).with_name("efquant-fx")
    t0 = time.perf_counter()
    subprocess.run([str(exe), "--help"], check=True, capture_output=True)
    return time.perf_counter() - t0


def apply_row(shared: Path) -> dict[str, Any]:
    """Peak RSS of a child ``efquant-fx apply`` of the shipped W8A8 recipe on the real teacher."""
    exe = Path(sys.executable).with_name("efquant-fx")
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(exe), "apply", str(REPO / "efquant_fx" / "recipes" / "mobilefacenet_w8a8.yaml"), "--model",
               str(shared / MXNET), "--out", str(Path(out) / "run")]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "EFQUANT_SHARED": str(shared)})
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    row = {"command": " ".join(cmd[1:]), "exit_code": proc.returncode, "wall_s": round(wall, 1),
           "peak_rss_mib": round(peak / 1024, 1), "run_dir_mib": round(size / 2**20, 2)}
    if peak <= before:
        row["note"] = "an earlier child process peaked higher; peak_rss_mib is the largest child's"
    if proc.returncode:
        row["stderr_tail"] = proc.stderr[-800:]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=default_shared())
    ap.add_argument("--images", type=int, default=1024, help="faces embedded per timing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-apply", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"command": [sys.executable, *sys.argv] if argv is None else ["speed.py", *argv]}
    report["cli_help_s"] = round(cli_help_s(), 2)  # first: a fresh process, before this one grows
    if not args.skip_apply and (args.shared / MXNET).is_file():
        report["apply"] = apply_row(args.shared)
    teacher, report["teacher"], images = teacher_and_images(args.shared, args.images)
    w8, w4a4 = students(teacher, images)
    emb = embed_times(teacher, w8, images, args.repeats)
    steps = step_times(teacher, w4a4, images, args.repeats)
    report["embed_s"] = {k: round(v, 3) for k, v in emb.items()}
    report["train_step_s"] = {k: round(v, 3) for k, v in steps.items()}
    report["headline"] = {
        "qat_step_ratio_w4a4": round(steps["w4a4_qat"] / steps["float"], 2),
        "qat_step_ratio_w4a4_brevitas_forward": round(steps["w4a4_qat_brevitas"] / steps["float"], 2),
        "fakequant_embed_ratio": round(emb["w8a8_frozen"] / emb["float"], 2),
        "fakequant_embed_ratio_brevitas_forward": round(emb["w8a8_brevitas"] / emb["float"], 2),
        "apply_peak_rss_mib": report["apply"]["peak_rss_mib"] if report.get("apply", {}).get("exit_code") == 0
        else None,
        "cli_help_s": report["cli_help_s"],
        "finetune_faces_per_s_w4a4": round(64 / steps["w4a4_qat"], 1),
    }
    report["machine"] = {**machine(args.threads), "shared": SHARED_NOTE}
    report["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(args.out, report)
    for k, v in report["headline"].items():
        print(f"{k:42s} {v}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
