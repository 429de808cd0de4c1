"""The fine-tune loop: distil the frozen float teacher into the compressed student (Ef-QuantFace).

A plain loop in the style of the torchvision references: build the data, the loss, the optimizer and
the per-step LR schedule, then ``for step: forward teacher (no grad) and student, loss, backward,
clip, step``. Everything a long run needs is around that loop and nothing is hidden in it:

* data from ``recipe.finetune.data`` (P identities x K images per batch, so EKD has positive pairs;
  ``kind: random`` for smoke tests, ``kind: synthetic`` for the data-free mode);
* BN policy: ``teacher`` keeps the student's BatchNorms in eval mode (statistics stay the teacher's,
  recommended with a few thousand images) and ``reestimate`` lets them update (QuantFace's choice);
* ``calibrate_steps``: the first N steps observe activation ranges afresh (the quant points pass
  float values through while observing, as in PTQ calibration), then the ranges are frozen;
  0 keeps the PTQ ranges;
* EKD thresholds still at 0 are set from the first batch (then the usual EMA): with TFace's momentum
  0.01 they would need ~300 steps to reach the FPR operating points (:func:`_ekd_warm_start`);
* atomic checkpoints (``last.pt``; ``best.pt`` on the evaluation metric) and an exact resume: same
  seed and data order give the same final weights as an uninterrupted run; an unwritable directory or
  a disk too small for the checkpoints fails before training, and a write that fails later (disk full)
  is one :class:`EfquantError` that leaves the previous checkpoint intact;
* CUDA out of memory becomes an :class:`EfquantError` that names the batch and suggests a smaller one;
* a step whose loss or gradient is NaN/inf is skipped (no update, buffers restored); after
  ``max_bad_steps`` in a row the run stops with an :class:`EfquantError`, keeping the last good
  checkpoint;
* AMP (bf16, or fp16 with a GradScaler) and channels_last only when the student is on CUDA;
* SIGINT/SIGTERM set a flag checked after every step: the loop writes a checkpoint, restores the
  previous handlers and then re-delivers the signal (KeyboardInterrupt / exit, or the caller's handler);
* under ``torchrun`` (an initialised process group) the student is wrapped in DDP, the sampler is split
  by rank, embeddings are all-gathered before the loss (EKD ranks pairs over the global batch), and
  only rank 0 writes files or shows progress. Per-rank batch = P*K, global batch = world_size*P*K.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from efquant_fx.data.base import FaceDataset
from efquant_fx.data.sampler import IdentityBalancedBatchSampler
from efquant_fx.data.training import RandomFaceDataset, build_training_data
from efquant_fx.errors import EfquantError
from efquant_fx.finetune.losses import CombinedLoss, EKDLoss, build_combined_loss
from efquant_fx.graph import calibrate as calib
from efquant_fx.graph.modules import ActQuant
from efquant_fx.models.checkpoint import load_error
from efquant_fx.recipe import FinetuneConfig, Recipe
from efquant_fx.result import CompressionResult, atomic_torch_save

log = logging.getLogger(__name__)

Evaluator = Callable[[nn.Module], Mapping[str, float]]
CHECKPOINT_FORMAT = "efquant-finetune-v1"
_BN = nn.modules.batchnorm._BatchNorm


# ----------------------------------------------------------------------------- helpers


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def detect(cls) -> DistInfo:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return cls()


def lr_factor(step: int, cfg: FinetuneConfig) -> float:
    """LR multiplier for 0-based ``step``: linear warm-up, then cosine (to 0), step (x0.1) or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "cosine":
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return 0.1 ** sum(step >= m for m in cfg.step_milestones)
    return 1.0


def set_train_mode(student: nn.Module, batchnorm: str) -> None:
    """Student in train mode; with ``batchnorm: teacher`` its BatchNorms stay in eval (frozen statistics)."""
    student.train()
    if batchnorm == "teacher":
        for m in student.modules():
            if isinstance(m, _BN):
                m.eval()


def check_writable(out: Path) -> None:
    """Fail before training when checkpoints could not be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise EfquantError(f"cannot write fine-tune checkpoints here ({exc.strerror or exc})", source=str(out),
                           field="out_dir") from None


def checkpoint_bytes(student: nn.Module, cfg: FinetuneConfig) -> int:
    """About how large ``last.pt`` gets: the student's state plus the optimizer's per-parameter state."""
    slots = 2 if cfg.optimizer == "adamw" else (1 if cfg.momentum > 0 else 0)
    params = sum(p.numel() * p.element_size() for p in student.parameters() if p.requires_grad)
    state = sum(t.numel() * t.element_size() for t in student.state_dict().values() if isinstance(t, Tensor))
    return state + slots * params


def check_free_space(out: Path, student: nn.Module, cfg: FinetuneConfig) -> None:
    """Fail before training when the disk cannot hold the checkpoints (``last.pt`` while it is
    replaced, i.e. twice, plus ``best.pt``); a full disk found later still leaves the last checkpoint."""
    ckpt = checkpoint_bytes(student, cfg)
    need = 2 * ckpt + ckpt // 2 + (1 << 20)
    try:
        free = shutil.disk_usage(out).free
    except OSError:  # not every filesystem reports it: the write itself will tell
        return
    if free < need:
        raise EfquantError(f"only {free / 2**20:.1f} MiB free, fine-tune checkpoints need about "
                           f"{need / 2**20:.1f} MiB; free some space or choose another directory",
                           source=str(out), field="out_dir")


def _save(obj: Any, path: Path, what: str, kept: str) -> None:
    """:func:`atomic_torch_save`, and on a write error (disk full, quota, permissions) one clear error;
    the previous file at ``path`` is never touched and the partial temp file is removed."""
    try:
        atomic_torch_save(obj, path)
    except OSError as exc:
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)
        raise EfquantError(f"cannot write the {what} ({exc.strerror or exc}); {kept}", source=str(path)) from None


def _resume_hash(recipe: Recipe) -> str:
    """What must not change between a run and its resume (evaluation/export settings may)."""
    import hashlib
    import json

    data = recipe.to_dict()
    for key in ("eval", "export", "name", "description"):
        data.pop(key, None)
    data.get("finetune", {}).pop("eval_every", None)
    data.get("finetune", {}).pop("checkpoint_every", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _observing(model: nn.Module) -> bool:
    return any(isinstance(m, ActQuant) and m.observer is not None for m in model.modules())


def _sync_and_freeze(student: nn.Module, info: DistInfo) -> list[dict]:
    """Freeze activation ranges; under DDP merge the ranks' min/max first, then take rank 0's quantizers."""
    if info.active:
        for m in student.modules():
            obs = getattr(m, "observer", None) if isinstance(m, ActQuant) else None
            if obs is not None and getattr(obs, "efq_kind", "minmax") in ("minmax", "moving_average"):
                dist.all_reduce(obs.min_val, op=dist.ReduceOp.MIN)
                dist.all_reduce(obs.max_val, op=dist.ReduceOp.MAX)
    stats = calib.freeze_ranges(student)
    if info.active:
        with torch.no_grad():
            for t in list(student.parameters()) + list(student.buffers()):
                dist.broadcast(t.data, 0)
    return stats


def _gather(t: Tensor, info: DistInfo, keep_grad: bool) -> Tensor:
    """All-gather along dim 0; the local slice keeps its autograd graph when ``keep_grad``."""
    parts = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(parts, t.detach().contiguous())
    if keep_grad:
        parts[info.rank] = t
    return torch.cat(parts)


@contextmanager
def _stop_on_signals(flag: dict[str, Any]) -> Iterator[None]:
    """SIGINT/SIGTERM set ``flag['signal']`` (a second one interrupts at once); handlers restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        if flag.get("signal") is not None:  # second signal: give up waiting for the step to end
            for s, h in previous.items():
                signal.signal(s, h)
            raise KeyboardInterrupt
        flag["signal"] = signal.Signals(signum).name
        flag["signum"] = signum
        log.warning("%s received: finishing this step, writing a checkpoint and stopping", flag["signal"])

    for s in (signal.SIGINT, signal.SIGTERM):
        previous[s] = signal.getsignal(s)
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class _Progress:
    """A rich progress bar with loss terms and images/s; silent off a terminal or when disabled."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        if not console.is_terminal:
            return
        self.bar = Progress(TextColumn("fine-tune"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[info]}"), console=console, transient=False)
        self.task = self.bar.add_task("fine-tune", total=total, completed=start, info="")

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def update(self, row: Mapping[str, Any]) -> None:
        if self.bar is None:
            return
        skip = {"kind", "step", "epoch", "lr", "images_per_s", "grad_norm", "skipped"}
        terms = " ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in skip and isinstance(v, float))
        info = f"{terms} lr={row['lr']:.2e} {row['images_per_s']:.1f} img/s"
        self.bar.update(self.task, completed=row["step"], info=info)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


@torch.no_grad()
def fidelity_evaluator(teacher: nn.Module, images: Tensor, batch_size: int = 64) -> Evaluator:
    """An evaluator: teacher-student embedding cosine (``cosine_mean``/``cosine_min``) on fixed images."""
    images = images.detach()
    teacher_emb: list[Tensor] = []

    def device_of(model: nn.Module) -> torch.device:
        return next(iter(model.parameters()), torch.empty(0)).device

    def evaluate(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            if not teacher_emb:
                dev = device_of(teacher)
                teacher_emb.append(torch.cat([nn.functional.normalize(teacher(b.to(dev)).float(), dim=1).cpu()
                                              for b in images.split(batch_size)]))
            dev = device_of(model)
            s = torch.cat([nn.functional.normalize(model(b.to(dev)).float(), dim=1).cpu()
                           for b in images.split(batch_size)])
        cos = (s * teacher_emb[0]).sum(1)
        return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}

    return evaluate


@dataclass
class _Best:
    metric: str | None = None
    value: float | None = None
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    state: dict[str, Tensor] | None = None


# ----------------------------------------------------------------------------- the loop


def finetune(
    result: CompressionResult,
    *,
    out_dir: Path | str | None = None,
    resume: bool = False,
    evaluator: Evaluator | None = None,
    progress: bool = True,
    best_metric: str | None = None,
    higher_is_better: bool = True,
    stop_at: int | None = None,
) -> CompressionResult:
    """Fine-tune ``result.model`` (the student) against ``result.teacher`` as ``result.recipe.finetune`` says.

    ``out_dir`` receives ``last.pt`` (every ``checkpoint_every`` steps and at the end) and ``best.pt``;
    ``resume`` continues from ``out_dir/last.pt``. ``evaluator(model) -> {metric: value}`` runs at step 0
    every ``eval_every`` steps and at the end (an evaluator given here runs at step 0 and at the end even
    with ``eval_every: 0``; ``compress()`` passes one on its held-out calibration batch; without one,
    ``eval_every`` > 0 uses teacher-student cosine on 64 fine-tune images) on rank 0 only;
    the best weights on ``best_metric`` (default: the evaluator's first metric, ``higher_is_better``) are
    restored at the end. ``stop_at`` ends this call after that many steps (checkpoint written; the LR
    schedule still spans ``finetune.steps``), so time-boxed jobs continue with ``resume``.
    Appends one row per step (``kind: train``) and per evaluation (``kind: eval``) to ``result.history``.
    Returns ``result`` with the fine-tuned student in eval mode.
    """
    recipe = result.recipe
    cfg = recipe.finetune
    if cfg is None:
        raise EfquantError("the recipe has no finetune section", field="finetune")
    info = DistInfo.detect()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        check_writable(out)
    elif resume:
        raise EfquantError("resume needs the directory holding last.pt", field="out_dir")
    t_start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    np.random.seed(recipe.seed % 2**32)

    student, teacher = result.model, result.teacher
    if out is not None and info.main:
        check_free_space(out, student, cfg)
    device = next(iter(student.parameters()), torch.empty(0)).device
    use_cuda = device.type == "cuda"
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if use_cuda and cfg.amp \
        else None
    channels_last = use_cuda and cfg.channels_last

    teacher.eval()  # frozen: its forward runs under no_grad, and it is never given to the optimizer

    dataset, report, has_ids = build_training_data(cfg, teacher, recipe.seed,
                                                   progress=progress if info.main else False)
    if info.main:
        log.info("%s", report.summary())
    p, k = (cfg.identities_per_batch, cfg.images_per_identity) if has_ids else \
        (cfg.identities_per_batch * cfg.images_per_identity, 1)
    try:
        sampler = IdentityBalancedBatchSampler(dataset.labels, p, k, seed=dataset.seed, rank=info.rank,
                                               world_size=info.world_size)
    except EfquantError as exc:
        raise EfquantError(f"{str(exc).split(': ', 1)[-1]} ({report.loaded} images of {report.identities} "
                           "identities loaded)", source=report.source, field="finetune.identities_per_batch") from None

    loss_fn = _build_loss(cfg, dataset, teacher, device)
    if channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)

    step, epoch, batch_in_epoch, bad_in_a_row, bad_total = 0, 0, 0, 0, 0
    best = _Best(metric=best_metric)
    history: list[dict[str, Any]] = []
    last_good: int | None = None
    ckpt_path = out / "last.pt" if out is not None else None
    state: dict[str, Any] | None = None
    if resume and ckpt_path is not None and ckpt_path.is_file():
        state = _load_checkpoint(ckpt_path, recipe)
        if state["step"] < cfg.calibrate_steps:
            calib.start_observing(student)  # the observers' buffers are part of that checkpoint
        # weights before the optimizer is built: Brevitas replaces its scale Parameters on load
        student.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["loss"])
    elif resume:
        result.notes.append(f"fine-tune: no checkpoint at {ckpt_path}; started from step 0")
    if state is None or state["step"] < cfg.calibrate_steps:
        if cfg.calibrate_steps and not _observing(student):
            calib.start_observing(student)

    decay, no_decay = [], []
    for param in list(student.parameters()) + list(loss_fn.parameters()):
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)  # no decay on BN, biases, PReLU, quant scales
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                                           nesterov=cfg.momentum > 0)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        bad_total, history = state["bad_total"], list(state["history"])
        saved_best = state["best"]
        best = _Best(best_metric or saved_best["metric"], saved_best["value"], saved_best["step"],
                     dict(saved_best["metrics"]))
        if best.step is not None and out is not None and (out / "best.pt").is_file():
            best.state = torch.load(out / "best.pt", map_location="cpu", weights_only=True)["model"]
        last_good = step
        if info.main:
            log.info("resumed from %s at step %d", ckpt_path, step)

    model: nn.Module = student
    if info.active:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if use_cuda else None,
            find_unused_parameters=step < cfg.calibrate_steps,  # observing points leave their quant scales unused
        )
    if evaluator is None and cfg.eval_every:
        fixed = torch.stack([dataset[i][0] for i in range(min(len(dataset), 64))])
        evaluator = fidelity_evaluator(teacher, fixed)
        if info.main:
            result.notes.append("fine-tune evaluation: teacher-student cosine on 64 fine-tune images")

    def evaluate(at_step: int) -> None:
        if evaluator is None or not info.main:
            return
        if _observing(student):
            log.info("step %d: evaluation skipped while activation ranges are being observed", at_step)
            return
        student.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in evaluator(student).items()}
        set_train_mode(student, cfg.batchnorm)
        history.append({"kind": "eval", "step": at_step, **metrics, "eval_s": time.perf_counter() - t0})
        log.info("step %d: %s", at_step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if not metrics:
            return
        if best.metric is None:
            best.metric = next(iter(metrics))
        if best.metric not in metrics:
            raise EfquantError(f"the evaluator returned no {best.metric!r} (it returned {sorted(metrics)})",
                               field="best_metric")
        value = metrics[best.metric]
        better = best.value is None or (value > best.value if higher_is_better else value < best.value)
        if better and math.isfinite(value):
            best.value, best.step, best.metrics = value, at_step, metrics
            best.state = {k: v.detach().to("cpu", copy=True) for k, v in student.state_dict().items()}
            if out is not None:
                _save({"format": CHECKPOINT_FORMAT, "model": best.state, "step": at_step, "metric": best.metric,
                       "metrics": metrics}, out / "best.pt", "best checkpoint", "the previous best.pt is intact")

    def save_checkpoint() -> None:
        nonlocal last_good
        if ckpt_path is None or not info.main:
            return
        kept = f"the previous {ckpt_path.name} (step {last_good}) is intact" if last_good is not None else \
            "no checkpoint was written yet"
        _save({
            "format": CHECKPOINT_FORMAT, "recipe_hash": _resume_hash(recipe), "step": step, "epoch": epoch,
            "batch_in_epoch": batch_in_epoch, "sampler_epoch": epoch, "model": student.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "loss": loss_fn.state_dict(), "rng": _rng_state(),
            "bad_total": bad_total, "history": history,
            "best": {"metric": best.metric, "value": best.value, "step": best.step, "metrics": best.metrics},
        }, ckpt_path, "fine-tune checkpoint", kept + "; free some space, then continue with resume")
        last_good = step

    flag: dict[str, Any] = {}
    stop_reason: str | None = None
    params = [q for g in optimizer.param_groups for q in g["params"]]
    in_memory = isinstance(dataset, RandomFaceDataset) or hasattr(dataset, "images")
    cpus = os.cpu_count() or 1
    num_workers = 0 if in_memory or cpus <= 2 else min(4, cpus // info.world_size)
    ema_speed: float | None = None
    set_train_mode(student, cfg.batchnorm)
    try:
        if step == 0 and cfg.calibrate_steps == 0:
            evaluate(0)  # the PTQ baseline: fine-tuning must beat it to be kept
        with _stop_on_signals(flag), _Progress(cfg.steps, step, progress and info.main) as bar:
            while step < cfg.steps and stop_reason is None:
                if batch_in_epoch >= len(sampler):
                    epoch, batch_in_epoch = epoch + 1, 0
                sampler.set_epoch(epoch)
                dataset.set_epoch(epoch)
                loader = DataLoader(dataset, batch_sampler=list(sampler)[batch_in_epoch:], num_workers=num_workers,
                                    pin_memory=use_cuda)
                t_batch = time.perf_counter()
                for images, labels in loader:
                    images = images.to(device, non_blocking=True)
                    labels = labels.to(device, non_blocking=True)
                    if channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    saved = _snapshot(student, loss_fn)
                    autocast = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else nullcontext()
                    with torch.no_grad(), autocast:
                        t_emb = teacher(images).float()
                    with autocast:
                        s_emb = model(images).float()
                    if info.active:  # EKD ranks pairs over the global batch
                        s_all, t_all = _gather(s_emb, info, True), _gather(t_emb, info, False)
                        y_all = _gather(labels, info, False)
                    else:
                        s_all, t_all, y_all = s_emb, t_emb, labels
                    with _ekd_warm_start(loss_fn, step == 0):
                        total, terms = loss_fn(s_all, t_all, y_all if has_ids or loss_fn.requires_labels else None)
                    loss_ok = math.isfinite(terms["total"])
                    # always backward (DDP expects it on every rank); a bad loss becomes a zero on the graph
                    optimizer.zero_grad(set_to_none=True)
                    backward_loss = total if loss_ok else s_emb.sum() * 0.0
                    scaler.scale(backward_loss * info.world_size).backward()  # DDP averages a global loss
                    if info.active:
                        for q in loss_fn.parameters():  # a loss head is replicated, not reduced by DDP
                            if q.grad is not None:
                                q.grad.div_(info.world_size)
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm or float("inf"))
                    grad_ok = bool(torch.isfinite(grad_norm))
                    bad = not loss_ok or (not grad_ok and not scaler.is_enabled())
                    if bad:
                        _restore(saved)
                        bad_in_a_row += 1
                        bad_total += 1
                    else:
                        scaler.step(optimizer)  # with fp16 the scaler itself skips inf gradients
                        scaler.update()
                        bad_in_a_row = 0
                    lr = optimizer.param_groups[0]["lr"]
                    scheduler.step()
                    step += 1
                    batch_in_epoch += 1
                    if step == cfg.calibrate_steps and _observing(student):
                        stats = _sync_and_freeze(student, info)
                        if info.main:
                            log.info("step %d: activation ranges frozen at %d points", step, len(stats))

                    now = time.perf_counter()
                    speed = images.shape[0] * info.world_size / max(now - t_batch, 1e-9)
                    ema_speed = speed if ema_speed is None else 0.9 * ema_speed + 0.1 * speed
                    t_batch = now
                    row = {"kind": "train", "step": step, "epoch": epoch, "lr": lr, "loss": terms["total"],
                           **{name: v for name, v in terms.items() if name != "total"},
                           "grad_norm": float(grad_norm), "images_per_s": speed, "skipped": bad or not grad_ok}
                    history.append(row)
                    bar.update({**row, "images_per_s": ema_speed})

                    if bad:
                        where = "loss" if not loss_ok else "gradient"
                        log.warning("step %d: %s is NaN/inf; step skipped (%d in a row)", step, where, bad_in_a_row)
                        if bad_in_a_row >= max(cfg.max_bad_steps, 1):
                            kept = f"{ckpt_path} (step {last_good})" if last_good is not None else \
                                "none written (no out_dir)"
                            raise EfquantError(
                                f"the {where} was NaN/inf for {bad_in_a_row} steps in a row (up to step {step}); "
                                f"stopped. Last good checkpoint: {kept}; the student in memory keeps its last good "
                                "weights. Lower finetune.lr, keep finetune.clip_grad_norm, or use more bits",
                                field="finetune.max_bad_steps",
                            )
                    elif cfg.eval_every and step % cfg.eval_every == 0:
                        evaluate(step)

                    if flag.get("signal") is not None:
                        stop_reason = flag["signal"]
                    elif stop_at is not None and stop_at <= step < cfg.steps:
                        stop_reason = f"stop_at={stop_at}"
                    if info.active:  # every rank stops at the same step
                        stop = torch.tensor([1 if stop_reason else 0], device=device)
                        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
                        if stop.item() and stop_reason is None:
                            stop_reason = "a signal on another rank"
                    if not bad and (stop_reason is not None or step % cfg.checkpoint_every == 0 or step >= cfg.steps):
                        save_checkpoint()
                    if stop_reason is not None or step >= cfg.steps:
                        break

        if _observing(student):  # calibrate_steps >= steps, or stopped while observing: usable model anyway
            _sync_and_freeze(student, info)
            result.notes.append(f"fine-tune ended at step {step} while observing activation ranges "
                                f"(calibrate_steps={cfg.calibrate_steps}); ranges frozen from what was seen")
        if stop_reason is None and (not cfg.eval_every or step % cfg.eval_every != 0):
            evaluate(step)
        if stop_reason is not None:
            result.notes.append(f"fine-tune stopped by {stop_reason} at step {step} of {cfg.steps}"
                                + (f"; resume from {ckpt_path}" if ckpt_path is not None else ""))
            history.append({"kind": "stopped", "step": step, "reason": stop_reason})
        elif best.state is not None and best.step != step:
            student.load_state_dict(best.state)
            result.notes.append(f"fine-tune: kept the best evaluated weights, step {best.step} "
                                f"({best.metric}={best.value:.4f})")
        if bad_total:
            result.notes.append(f"fine-tune skipped {bad_total} step(s) with a NaN/inf loss or gradient")
    except torch.OutOfMemoryError as exc:
        kept = f"; last checkpoint: {ckpt_path} (step {last_good})" if last_good is not None else ""
        detail = ". ".join((str(exc).strip().splitlines() or ["out of memory"])[0].split(". ")[:2]).rstrip(".")
        raise EfquantError(
            f"out of memory on {device} at step {step + 1} with a batch of {p} x {k} = {p * k} images per "
            f"process ({detail}); use a smaller batch: lower finetune.identities_per_batch or "
            f"finetune.images_per_identity, or keep finetune.amp on{kept}",
            field="finetune.identities_per_batch",
        ) from None
    finally:
        if channels_last:
            student.to(memory_format=torch.contiguous_format)
            teacher.to(memory_format=torch.contiguous_format)
        student.eval()
        result.history.extend(history)
        result.timings["finetune"] = result.timings.get("finetune", 0.0) + time.perf_counter() - t_start
    result.model = student
    result.notes.extend(f"fine-tune data: {n}" for n in report.notes)
    if flag.get("signum") is not None:
        # checkpoint written, handlers restored: now deliver the signal as the process would have
        # (SIGINT -> KeyboardInterrupt, SIGTERM -> exit; a caller's own handler gets it instead)
        signal.raise_signal(flag["signum"])
    return result


def _build_loss(cfg: FinetuneConfig, dataset: FaceDataset, teacher: nn.Module, device: torch.device) -> CombinedLoss:
    spec: dict[str, Any] = {}
    for name, term in cfg.losses.items():
        options = dict(term.options)
        if name == "margin":
            options.setdefault("num_classes", dataset.num_classes)
            if "embedding_size" not in options:
                with torch.no_grad():
                    probe = dataset[0][0][None].to(device)
                    options["embedding_size"] = int(teacher(probe).shape[1])
        spec[name] = {"weight": term.weight, **options}
    return build_combined_loss(spec, source="recipe finetune.losses").to(device)


@contextmanager
def _ekd_warm_start(loss_fn: nn.Module, first_step: bool) -> Iterator[None]:
    """On the first step, EKD thresholds that are still 0 are set from that batch (momentum 1).

    TFace starts them at 0 with EMA momentum 0.01, which needs ~300 steps to reach the batch's FPR
    operating points; a fine-tune of a few hundred steps would spend most of its time with thresholds
    below every pair's similarity (rank counts saturated, no signal). Later steps use the EMA as usual.
    """
    warm = [m for m in loss_fn.modules() if isinstance(m, EKDLoss) and first_step
            and not bool(m.s_thresholds.any()) and not bool(m.t_thresholds.any())]
    saved = [m.momentum for m in warm]
    for m in warm:
        m.momentum = 1.0
    try:
        yield
    finally:
        for m, momentum in zip(warm, saved, strict=True):
            m.momentum = momentum


def _snapshot(student: nn.Module, loss_fn: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """Copies of the buffers a forward may change (BN statistics, observers, EKD thresholds)."""
    return [(b, b.detach().clone()) for b in list(student.buffers()) + list(loss_fn.buffers())]


def _restore(saved: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for buf, copy in saved:
            if buf.shape == copy.shape:
                buf.copy_(copy)


def _load_checkpoint(path: Path, recipe: Recipe) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise load_error(exc, path, "fine-tune checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise EfquantError("not an efquant fine-tune checkpoint", source=str(path))
    missing = sorted({"recipe_hash", "step", "epoch", "batch_in_epoch", "model", "optimizer", "scheduler", "scaler",
                      "loss", "rng", "bad_total", "history", "best"} - set(state))
    if missing:
        raise EfquantError(f"incomplete fine-tune checkpoint (no {', '.join(missing)}); start a new run directory",
                           source=str(path))
    if state["recipe_hash"] != _resume_hash(recipe):
        raise EfquantError("this checkpoint was written by a different recipe (model, quantization, data or "
                           "fine-tune settings changed); start a new run directory", source=str(path))
    return state
