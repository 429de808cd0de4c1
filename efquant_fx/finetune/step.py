"""One training step: teacher and student forward, loss, backward, clip, update; a NaN/inf step changes nothing.

A bad step still runs backward (under DDP every rank must, or the others wait forever) on a zero loss,
then skips the update and puts back the buffers its forward changed (BatchNorm statistics, observers,
EKD thresholds), so the student is exactly as it was before the step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from efquant_fx.finetune.losses import CombinedLoss, EKDLoss
from efquant_fx.finetune.optim import Optim
from efquant_fx.finetune.runtime import DistInfo, Placement, gather


@dataclass
class StepParts:
    """What a step works on; built once per run."""

    model: nn.Module  # the student, or its DDP wrapper
    student: nn.Module
    teacher: nn.Module
    loss_fn: CombinedLoss
    optim: Optim
    info: DistInfo
    place: Placement
    clip_grad_norm: float | None
    use_labels: bool  # identity labels go to the loss (real identities, or a term that needs them)


@dataclass
class StepOutcome:
    terms: dict[str, float]  # the loss terms and their weighted ``total``
    grad_norm: float
    lr: float  # the LR this step used
    loss_ok: bool
    grad_ok: bool
    scaled: bool  # an fp16 GradScaler skipped an inf gradient itself (and lowered its scale)

    @property
    def bad(self) -> bool:
        """The step was skipped as NaN/inf and counts toward ``max_bad_steps``."""
        return not self.loss_ok or (not self.grad_ok and not self.scaled)

    @property
    def where(self) -> str:
        return "loss" if not self.loss_ok else "gradient"

    def row(self, step: int, epoch: int, images_per_s: float) -> dict[str, Any]:
        """The ``kind: train`` history row."""
        return {"kind": "train", "step": step, "epoch": epoch, "lr": self.lr, "loss": self.terms["total"],
                **{name: v for name, v in self.terms.items() if name != "total"},
                "grad_norm": self.grad_norm, "images_per_s": images_per_s, "skipped": self.bad or not self.grad_ok}


def train_step(parts: StepParts, images: Tensor, labels: Tensor, first_step: bool) -> StepOutcome:
    """Forward, loss, backward and update on one batch, then one LR-schedule step."""
    info, optimizer, scaler = parts.info, parts.optim.optimizer, parts.optim.scaler
    images, labels = parts.place.inputs(images, labels)
    saved = snapshot(parts.student, parts.loss_fn)
    with torch.no_grad(), parts.place.autocast():
        t_emb = parts.teacher(images).float()
    with parts.place.autocast():
        s_emb = parts.model(images).float()
    if info.active:  # EKD ranks pairs over the global batch
        s_all, t_all, y_all = gather(s_emb, info, True), gather(t_emb, info, False), gather(labels, info, False)
    else:
        s_all, t_all, y_all = s_emb, t_emb, labels
    with ekd_warm_start(parts.loss_fn, first_step):
        total, terms = parts.loss_fn(s_all, t_all, y_all if parts.use_labels else None)
    loss_ok = math.isfinite(terms["total"])
    optimizer.zero_grad(set_to_none=True)
    backward_loss = total if loss_ok else s_emb.sum() * 0.0  # a bad loss becomes a zero on the graph
    scaler.scale(backward_loss * info.world_size).backward()  # DDP averages a global loss
    if info.active:
        for q in parts.loss_fn.parameters():  # a loss head is replicated, not reduced by DDP
            if q.grad is not None:
                q.grad.div_(info.world_size)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(parts.optim.params, parts.clip_grad_norm or float("inf"))
    outcome = StepOutcome(terms, float(grad_norm), parts.optim.lr, loss_ok, bool(torch.isfinite(grad_norm)),
                          scaler.is_enabled())
    if outcome.bad:
        restore(saved)
    else:
        scaler.step(optimizer)  # with fp16 the scaler itself skips inf gradients
        scaler.update()
    parts.optim.scheduler.step()
    return outcome


@contextmanager
def ekd_warm_start(loss_fn: nn.Module, first_step: bool) -> Iterator[None]:
    """On the first step, EKD thresholds that are still 0 are set from that batch (momentum 1).

    TFace starts them at 0 with EMA momentum 0.01, which takes hundreds of steps to reach the batch's FPR
    operating points; a short fine-tune would spend most of its time with thresholds below every pair's
    similarity (rank counts saturated, no signal). Later steps use the EMA as usual.
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


def snapshot(student: nn.Module, loss_fn: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """Copies of the buffers a forward may change (BN statistics, observers, EKD thresholds)."""
    return [(b, b.detach().clone()) for b in list(student.buffers()) + list(loss_fn.buffers())]


def restore(saved: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for buf, copy in saved:
            if buf.shape == copy.shape:
                buf.copy_(copy)
