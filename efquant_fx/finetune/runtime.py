"""Where and how the loop runs: ranks under ``torchrun``, device and AMP, signals, seeds, train mode.

Kept apart from the loop so that :func:`efquant_fx.finetune.finetune` reads as the training it does;
everything here is about the process around it.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from efquant_fx.graph import calibrate as calib
from efquant_fx.graph.modules import ActQuant
from efquant_fx.recipe import FinetuneConfig

log = logging.getLogger(__name__)

_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class DistInfo:
    """This process's place in the process group (one process, rank 0, when there is none)."""

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


def gather(t: Tensor, info: DistInfo, keep_grad: bool) -> Tensor:
    """All-gather along dim 0; the local slice keeps its autograd graph when ``keep_grad``."""
    parts = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(parts, t.detach().contiguous())
    if keep_grad:
        parts[info.rank] = t
    return torch.cat(parts)


def agree_to_stop(reason: str | None, info: DistInfo, device: torch.device) -> str | None:
    """Under DDP every rank stops at the same step: one rank's signal stops them all."""
    if not info.active:
        return reason
    stop = torch.tensor([1 if reason else 0], device=device)
    dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    if stop.item() and reason is None:
        return "a signal on another rank"
    return reason


def wrap_ddp(student: nn.Module, info: DistInfo, device: torch.device, find_unused: bool) -> nn.Module:
    """The module the loop calls: ``student`` itself, or its DDP wrapper under ``torchrun``."""
    if not info.active:
        return student
    return nn.parallel.DistributedDataParallel(
        student, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused,
    )


@dataclass
class Placement:
    """Device, AMP dtype and memory format: AMP and channels_last only when the student is on CUDA."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    @classmethod
    def of(cls, student: nn.Module, cfg: FinetuneConfig) -> Placement:
        device = next(iter(student.parameters()), torch.empty(0)).device
        cuda = device.type == "cuda"
        amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda and cfg.amp \
            else None
        return cls(device, amp_dtype, cuda and cfg.channels_last)

    @property
    def use_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> AbstractContextManager[Any]:
        return torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()

    def inputs(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels

    def convert(self, *models: nn.Module) -> None:
        if self.channels_last:
            for m in models:
                m.to(memory_format=torch.channels_last)

    def release(self, *models: nn.Module) -> None:
        """Back to the default memory format: the caller gets the models as it gave them."""
        if self.channels_last:
            for m in models:
                m.to(memory_format=torch.contiguous_format)


@dataclass
class StopSignal:
    """The SIGINT/SIGTERM that asked the loop to stop, delivered again once the checkpoint is safe."""

    name: str | None = None
    signum: int | None = None

    def redeliver(self) -> None:
        """Deliver it as the process would have (SIGINT -> KeyboardInterrupt, SIGTERM -> exit; a
        caller's own handler gets it instead): only call this with the previous handlers back."""
        if self.signum is not None:
            signal.raise_signal(self.signum)


@contextmanager
def stop_on_signals(stop: StopSignal) -> Iterator[StopSignal]:
    """SIGINT/SIGTERM fill ``stop`` (a second one interrupts at once); the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        if stop.name is not None:  # second signal: give up waiting for the step to end
            for s, h in previous.items():
                signal.signal(s, h)
            raise KeyboardInterrupt
        stop.name, stop.signum = signal.Signals(signum).name, signum
        log.warning("%s received: finishing this step, writing a checkpoint and stopping", stop.name)

    for s in (signal.SIGINT, signal.SIGTERM):
        previous[s] = signal.getsignal(s)
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def set_train_mode(student: nn.Module, batchnorm: str) -> None:
    """Student in train mode; with ``batchnorm: teacher`` its BatchNorms stay in eval (frozen statistics)."""
    student.train()
    if batchnorm == "teacher":
        for m in student.modules():
            if isinstance(m, _BN):
                m.eval()


def observing(model: nn.Module) -> bool:
    """Whether quant points are still observing activation ranges (``calibrate_steps``)."""
    return any(isinstance(m, ActQuant) and m.observer is not None for m in model.modules())


def sync_and_freeze(student: nn.Module, info: DistInfo) -> list[dict]:
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
