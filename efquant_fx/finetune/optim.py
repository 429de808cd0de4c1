"""Optimizer, per-step LR schedule and AMP gradient scaler, built from ``recipe.finetune``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from efquant_fx.recipe import FinetuneConfig


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


@dataclass
class Optim:
    """What updates the weights; saved and restored together so a resume continues the same schedule."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def build_optim(cfg: FinetuneConfig, modules: list[nn.Module], amp_dtype: torch.dtype | None) -> Optim:
    """SGD (Nesterov when there is momentum) or AdamW over every trainable parameter of ``modules``.

    Weight decay only on weights (ndim > 1): decaying BatchNorm, biases, PReLU slopes or quant scales
    pulls them toward 0 for no regularising gain. The GradScaler is on only for fp16 AMP (bf16 needs none).
    """
    decay, no_decay = [], []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                (decay if param.ndim > 1 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                                           nesterov=cfg.momentum > 0)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    return Optim(optimizer, scheduler, scaler)
