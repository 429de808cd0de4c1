"""Evaluations during fine-tuning: a metric on rank 0 every ``eval_every`` steps, feeding the best weights."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from efquant_fx.finetune.best import BestWeights
from efquant_fx.finetune.checkpoint import Checkpointer
from efquant_fx.finetune.runtime import observing, set_train_mode

log = logging.getLogger(__name__)

Evaluator = Callable[[nn.Module], Mapping[str, float]]


def _device_of(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


@torch.no_grad()
def fidelity_evaluator(teacher: nn.Module, images: Tensor, batch_size: int = 64) -> Evaluator:
    """An evaluator: teacher-student embedding cosine (``cosine_mean``/``cosine_min``) on fixed images."""
    images = images.detach()
    teacher_emb: list[Tensor] = []  # computed on first use, then reused: the teacher never changes

    def evaluate(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            if not teacher_emb:
                dev = _device_of(teacher)
                teacher_emb.append(torch.cat([nn.functional.normalize(teacher(b.to(dev)).float(), dim=1).cpu()
                                              for b in images.split(batch_size)]))
            dev = _device_of(model)
            s = torch.cat([nn.functional.normalize(model(b.to(dev)).float(), dim=1).cpu()
                           for b in images.split(batch_size)])
        cos = (s * teacher_emb[0]).sum(1)
        return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}

    return evaluate


@dataclass
class Evaluation:
    """Runs ``evaluator`` on the student (rank 0 only), logs a ``kind: eval`` row and keeps the best weights."""

    evaluator: Evaluator | None
    student: nn.Module
    batchnorm: str  # the train-mode policy to return to afterwards
    best: BestWeights
    ckpt: Checkpointer
    enabled: bool = True

    def __call__(self, step: int, history: list[dict[str, Any]]) -> None:
        if self.evaluator is None or not self.enabled:
            return
        if observing(self.student):  # the quant points pass float values through: not the model to score
            log.info("step %d: evaluation skipped while activation ranges are being observed", step)
            return
        self.student.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in self.evaluator(self.student).items()}
        set_train_mode(self.student, self.batchnorm)
        history.append({"kind": "eval", "step": step, **metrics, "eval_s": time.perf_counter() - t0})
        log.info("step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if self.best.offer(step, metrics, self.student):
            self.ckpt.save_best(self.best)
