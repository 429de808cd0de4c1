"""The fine-tune loop: distil the frozen float teacher into the compressed student (Ef-QuantFace).

A plain loop in the style of the torchvision references: build the data, the loss, the optimizer and the
schedule, then ``for epoch: for batch: train_step``. The parts a long run needs live beside it:
:mod:`~efquant_fx.finetune.step` (one step, NaN/inf guard), :mod:`~efquant_fx.finetune.optim`,
:mod:`~efquant_fx.finetune.checkpoint` (atomic ``last.pt``, exact resume), :mod:`~efquant_fx.finetune.best`,
:mod:`~efquant_fx.finetune.batches`, :mod:`~efquant_fx.finetune.evaluate` and
:mod:`~efquant_fx.finetune.runtime` (DDP, AMP, channels_last, signals).

* BN policy: ``teacher`` keeps the student's BatchNorms in eval mode (statistics stay the teacher's, the
  safer choice with a few thousand images); ``reestimate`` lets them update (QuantFace's choice);
* ``calibrate_steps``: the first N steps observe activation ranges afresh (the quant points pass float
  values through while observing, as in PTQ calibration), then the ranges are frozen; 0 keeps PTQ's;
* an unwritable directory or a disk too small for the checkpoints fails before training; CUDA out of
  memory is one :class:`EfquantError` that names the batch and suggests a smaller one;
* after ``max_bad_steps`` NaN/inf steps in a row the run stops, keeping the last good checkpoint;
* SIGINT/SIGTERM finish the step, write a checkpoint, restore the previous handlers and then deliver the
  signal again, so the process ends as it would have (or the caller's handler gets it);
* under ``torchrun`` the student is wrapped in DDP, the sampler is split by rank, embeddings are
  all-gathered before the loss (EKD ranks pairs over the global batch), and only rank 0 writes files or
  shows progress. Per-rank batch = P*K, global batch = world_size*P*K.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from efquant_fx.data.base import FaceDataset
from efquant_fx.errors import EfquantError
from efquant_fx.finetune.batches import TrainingBatches
from efquant_fx.finetune.best import BestWeights
from efquant_fx.finetune.checkpoint import CHECKPOINT_FORMAT, Checkpointer, RunState, set_rng_state
from efquant_fx.finetune.evaluate import Evaluation, Evaluator, fidelity_evaluator
from efquant_fx.finetune.losses import CombinedLoss, build_combined_loss
from efquant_fx.finetune.optim import Optim, build_optim, lr_factor
from efquant_fx.finetune.progress import Progress
from efquant_fx.finetune.runtime import (
    DistInfo,
    Placement,
    StopSignal,
    agree_to_stop,
    observing,
    seed_everything,
    set_train_mode,
    stop_on_signals,
    sync_and_freeze,
    wrap_ddp,
)
from efquant_fx.finetune.step import StepOutcome, StepParts, train_step
from efquant_fx.graph import calibrate as calib
from efquant_fx.graph.fakequant import fast_fake_quant
from efquant_fx.recipe import FinetuneConfig

if TYPE_CHECKING:
    from efquant_fx.result import CompressionResult

__all__ = ["CHECKPOINT_FORMAT", "Evaluator", "fidelity_evaluator", "finetune", "lr_factor", "set_train_mode"]

log = logging.getLogger(__name__)


@dataclass
class Loop:
    """What every step of a run uses, built once; what changes from step to step is :class:`RunState`."""

    cfg: FinetuneConfig
    parts: StepParts
    ckpt: Checkpointer
    best: BestWeights
    evaluate: Evaluation
    stop: StopSignal
    stop_at: int | None


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
    ``resume`` continues from ``out_dir/last.pt``. ``evaluator(model) -> {metric: value}`` runs on rank 0
    at step 0, every ``eval_every`` steps and at the end (a given one at step 0 and at the end even with
    ``eval_every: 0``; without one, ``eval_every`` > 0 uses teacher-student cosine on 64 fine-tune
    images); the best weights on ``best_metric`` (default: the evaluator's first metric,
    ``higher_is_better``) are restored at the end. ``stop_at`` ends this call after that many steps
    (checkpoint written; the LR schedule still spans ``finetune.steps``), so time-boxed jobs continue
    with ``resume``. Appends one row per step (``kind: train``) and per evaluation (``kind: eval``) to
    ``result.history``; returns ``result`` with the fine-tuned student in eval mode.
    """
    recipe, cfg = result.recipe, result.recipe.finetune
    if cfg is None:
        raise EfquantError("the recipe has no finetune section", field="finetune")
    info = DistInfo.detect()
    ckpt = Checkpointer.open(out_dir, recipe, resume=resume, writes=info.main)
    t_start = time.perf_counter()
    seed_everything(recipe.seed)
    student, teacher = result.model, result.teacher
    ckpt.check_free_space(student, cfg)
    place = Placement.of(student, cfg)
    teacher.eval()  # frozen: its forward runs under no_grad, and it is never given to the optimizer
    batches = TrainingBatches.build(cfg, teacher, recipe.seed, info, progress=progress, pin_memory=place.use_cuda)
    loss_fn = _loss_from_recipe(cfg, batches.dataset, teacher, place.device)
    place.convert(student, teacher)

    saved = ckpt.load_last() if resume else None
    if resume and saved is None:
        result.notes.append(f"fine-tune: no checkpoint at {ckpt.last}; started from step 0")
    _load_student(saved, student, loss_fn, cfg.calibrate_steps)  # before the optimizer is built
    optim = build_optim(cfg, [student, loss_fn], place.amp_dtype)
    run, best = RunState(), BestWeights(best_metric, higher_is_better)
    if saved is not None:
        run, best = _resume(saved, optim, ckpt, best, info)
    model = wrap_ddp(student, info, place.device, find_unused=run.step < cfg.calibrate_steps)
    parts = StepParts(model, student, teacher, loss_fn, optim, info, place, cfg.clip_grad_norm,
                      use_labels=batches.has_ids or loss_fn.requires_labels)
    if evaluator is None and cfg.eval_every:
        evaluator = _default_evaluator(batches.dataset, teacher)
        if info.main:
            result.notes.append("fine-tune evaluation: teacher-student cosine on 64 fine-tune images")
    evaluate = Evaluation(evaluator, student, cfg.batchnorm, best, ckpt, enabled=info.main)
    loop = Loop(cfg, parts, ckpt, best, evaluate, StopSignal(), stop_at)

    set_train_mode(student, cfg.batchnorm)
    try:
        if run.step == 0 and cfg.calibrate_steps == 0:
            evaluate(0, run.history)  # the PTQ baseline: fine-tuning must beat it to be kept
        with stop_on_signals(loop.stop), Progress(cfg.steps, run.step, progress and info.main) as bar, \
                fast_fake_quant(student) if cfg.fused_fake_quant else nullcontext():
            while run.step < cfg.steps and run.stop_reason is None:
                train_one_epoch(loop, run, batches.loader(run), bar)
        _finish(loop, run, result)
    except torch.OutOfMemoryError as exc:
        raise _out_of_memory(exc, place.device, run.step, batches, ckpt) from None
    finally:
        place.release(student, teacher)
        student.eval()
        result.history.extend(run.history)
        result.timings["finetune"] = result.timings.get("finetune", 0.0) + time.perf_counter() - t_start
    result.model = student
    result.notes.extend(f"fine-tune data: {n}" for n in batches.report.notes)
    loop.stop.redeliver()  # checkpoint written, handlers restored: now the signal does what it would have
    return result


def train_one_epoch(loop: Loop, run: RunState, loader: DataLoader, bar: Progress) -> None:
    """The rest of this epoch, one step per batch; returns early when the run stops or reaches its last step."""
    cfg, info, student = loop.cfg, loop.parts.info, loop.parts.student
    t_batch = time.perf_counter()
    for images, labels in loader:
        outcome = train_step(loop.parts, images, labels, first_step=run.step == 0)
        run.step += 1
        run.batch_in_epoch += 1
        run.bad_in_a_row = run.bad_in_a_row + 1 if outcome.bad else 0
        run.bad_total += 1 if outcome.bad else 0
        if run.step == cfg.calibrate_steps and observing(student):
            stats = sync_and_freeze(student, info)
            if info.main:
                log.info("step %d: activation ranges frozen at %d points", run.step, len(stats))

        now = time.perf_counter()
        row = outcome.row(run.step, run.epoch, images.shape[0] * info.world_size / max(now - t_batch, 1e-9))
        t_batch = now
        run.history.append(row)
        bar.update(row)

        if outcome.bad:
            _check_bad_steps(loop, run, outcome)
        elif cfg.eval_every and run.step % cfg.eval_every == 0:
            loop.evaluate(run.step, run.history)
        run.stop_reason = agree_to_stop(_stop_reason(loop, run.step), info, loop.parts.place.device)
        end = run.stop_reason is not None or run.step >= cfg.steps
        if not outcome.bad and (end or run.step % cfg.checkpoint_every == 0):
            loop.ckpt.save_last(run, student, loop.parts.optim, loop.parts.loss_fn, loop.best)
        if end:
            return


def _stop_reason(loop: Loop, step: int) -> str | None:
    if loop.stop.name is not None:
        return loop.stop.name
    if loop.stop_at is not None and loop.stop_at <= step < loop.cfg.steps:
        return f"stop_at={loop.stop_at}"
    return None


def _check_bad_steps(loop: Loop, run: RunState, outcome: StepOutcome) -> None:
    """Log a skipped step; stop the run after ``max_bad_steps`` of them in a row."""
    log.warning("step %d: %s is NaN/inf; step skipped (%d in a row)", run.step, outcome.where, run.bad_in_a_row)
    if run.bad_in_a_row >= max(loop.cfg.max_bad_steps, 1):
        kept = loop.ckpt.last_good_text() or "none written (no out_dir)"
        raise EfquantError(
            f"the {outcome.where} was NaN/inf for {run.bad_in_a_row} steps in a row (up to step {run.step}); "
            f"stopped. Last good checkpoint: {kept}; the student in memory keeps its last good "
            "weights. Lower finetune.lr, keep finetune.clip_grad_norm, or use more bits",
            field="finetune.max_bad_steps",
        )


def _finish(loop: Loop, run: RunState, result: CompressionResult) -> None:
    """After the last step: frozen ranges, a final evaluation, the best weights, and notes saying so."""
    cfg, student = loop.cfg, loop.parts.student
    if observing(student):  # calibrate_steps >= steps, or stopped while observing: usable model anyway
        sync_and_freeze(student, loop.parts.info)
        result.notes.append(f"fine-tune ended at step {run.step} while observing activation ranges "
                            f"(calibrate_steps={cfg.calibrate_steps}); ranges frozen from what was seen")
    if run.stop_reason is None and (not cfg.eval_every or run.step % cfg.eval_every != 0):
        loop.evaluate(run.step, run.history)
    if run.stop_reason is not None:
        result.notes.append(f"fine-tune stopped by {run.stop_reason} at step {run.step} of {cfg.steps}"
                            + (f"; resume from {loop.ckpt.last}" if loop.ckpt.last is not None else ""))
        run.history.append({"kind": "stopped", "step": run.step, "reason": run.stop_reason})
    elif (note := loop.best.restore(student, run.step)) is not None:
        result.notes.append(note)
    if run.bad_total:
        result.notes.append(f"fine-tune skipped {run.bad_total} step(s) with a NaN/inf loss or gradient")


def _out_of_memory(exc: torch.OutOfMemoryError, device: torch.device, step: int, batches: TrainingBatches,
                   ckpt: Checkpointer) -> EfquantError:
    """One line: where, which batch, torch's first two sentences, and what to change."""
    last = ckpt.last_good_text()
    kept = f"; last checkpoint: {last}" if last is not None else ""
    detail = ". ".join((str(exc).strip().splitlines() or ["out of memory"])[0].split(". ")[:2]).rstrip(".")
    p, k = batches.p, batches.k
    return EfquantError(
        f"out of memory on {device} at step {step + 1} with a batch of {p} x {k} = {p * k} images per "
        f"process ({detail}); use a smaller batch: lower finetune.identities_per_batch or "
        f"finetune.images_per_identity, or keep finetune.amp on{kept}",
        field="finetune.identities_per_batch",
    )


def _loss_from_recipe(cfg: FinetuneConfig, dataset: FaceDataset, teacher: nn.Module,
                      device: torch.device) -> CombinedLoss:
    """``finetune.losses``; a margin head gets its class count from the data and its width from the teacher."""
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


def _load_student(saved: dict[str, Any] | None, student: nn.Module, loss_fn: nn.Module, calibrate_steps: int) -> None:
    """Weights and loss buffers from ``saved``, and observers on while ``calibrate_steps`` last.

    Runs before the optimizer is built: Brevitas replaces its scale Parameters on load.
    """
    if saved is not None:
        if saved["step"] < calibrate_steps:
            calib.start_observing(student)  # the observers' buffers are part of that checkpoint
        student.load_state_dict(saved["model"])
        loss_fn.load_state_dict(saved["loss"])
    if (saved is None or saved["step"] < calibrate_steps) and calibrate_steps and not observing(student):
        calib.start_observing(student)


def _resume(saved: dict[str, Any], optim: Optim, ckpt: Checkpointer, best: BestWeights,
            info: DistInfo) -> tuple[RunState, BestWeights]:
    """Optimizer, schedule, scaler, RNG, position, history and best-so-far from ``last.pt``."""
    optim.load_state_dict(saved)
    set_rng_state(saved["rng"])
    run = RunState.from_checkpoint(saved)
    best = BestWeights.from_checkpoint(saved["best"], best.metric, best.higher_is_better, ckpt.load_best_weights)
    if info.main:
        log.info("resumed from %s at step %d", ckpt.last, run.step)
    return run, best


def _default_evaluator(dataset: FaceDataset, teacher: nn.Module) -> Evaluator:
    """Teacher-student cosine on the first 64 fine-tune images: a run without an evaluator still keeps its best."""
    return fidelity_evaluator(teacher, torch.stack([dataset[i][0] for i in range(min(len(dataset), 64))]))
