"""What a fine-tune run saves, and how it resumes exactly where it stopped.

``last.pt`` holds everything the next step depends on (weights, optimizer, schedule, scaler, loss
buffers, RNG state, data position, history, best so far), so a resumed run ends with the same weights
as an uninterrupted one. Only rank 0 writes. Every write is atomic: a crash or a full disk leaves the
previous checkpoint, and the run says which one.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from efquant_fx.errors import EfquantError
from efquant_fx.files import atomic_torch_save, check_writable
from efquant_fx.models.checkpoint import load_error
from efquant_fx.recipe import FinetuneConfig, Recipe

if TYPE_CHECKING:
    from efquant_fx.finetune.best import BestWeights
    from efquant_fx.finetune.optim import Optim

CHECKPOINT_FORMAT = "efquant-finetune-v1"
_KEYS = {"recipe_hash", "step", "epoch", "batch_in_epoch", "model", "optimizer", "scheduler", "scaler", "loss", "rng",
         "bad_total", "history", "best"}


@dataclass
class RunState:
    """Where the loop is: the step, the position in the data, the NaN/inf counts and the history rows."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    bad_in_a_row: int = 0
    bad_total: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any]) -> RunState:
        return cls(step=state["step"], epoch=state["epoch"], batch_in_epoch=state["batch_in_epoch"],
                   bad_total=state["bad_total"], history=list(state["history"]))


def resume_hash(recipe: Recipe) -> str:
    """What must not change between a run and its resume (evaluation/export settings may)."""
    data = recipe.to_dict()
    for key in ("eval", "export", "name", "description"):
        data.pop(key, None)
    finetune = data.get("finetune") or {}  # None for a PTQ-only recipe (apply --resume still compares it)
    finetune.pop("eval_every", None)
    finetune.pop("checkpoint_every", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    """torch, numpy, Python (and CUDA) generator states, as tensors and tuples ``weights_only`` loads."""
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


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def save(obj: Any, path: Path, what: str, kept: str) -> None:
    """An atomic ``torch.save``; a failed write (disk full, quota, permissions) is one error that says
    which file is still intact (``kept``)."""
    try:
        atomic_torch_save(obj, path)
    except OSError as exc:  # FileWriteError included: ours names the file still there
        raise EfquantError(f"cannot write the {what} ({exc.strerror or exc}); {kept}", source=str(path)) from None


def load_checkpoint(path: Path, recipe: Recipe) -> dict[str, Any]:
    """``last.pt`` loaded safely (``weights_only``) and checked: the format, every key, the same recipe."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise load_error(exc, path, "fine-tune checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise EfquantError("not an efquant fine-tune checkpoint", source=str(path))
    missing = sorted(_KEYS - set(state))
    if missing:
        raise EfquantError(f"incomplete fine-tune checkpoint (no {', '.join(missing)}); start a new run directory",
                           source=str(path))
    if state["recipe_hash"] != resume_hash(recipe):
        raise EfquantError("this checkpoint was written by a different recipe (model, quantization, data or "
                           "fine-tune settings changed); start a new run directory", source=str(path))
    return state


@dataclass
class Checkpointer:
    """``last.pt`` and ``best.pt`` in ``out`` (no files without one); ``writes`` is False off rank 0."""

    out: Path | None
    recipe: Recipe
    writes: bool = True
    last_good: int | None = None  # the step ``last.pt`` holds, once this run wrote or resumed one

    @classmethod
    def open(cls, out_dir: Path | str | None, recipe: Recipe, *, resume: bool, writes: bool) -> Checkpointer:
        """Fail before any work when ``out_dir`` cannot be written, or a resume has nothing to read."""
        out = Path(out_dir) if out_dir is not None else None
        if out is not None:
            check_writable(out, field="out_dir", what="fine-tune checkpoints")
        elif resume:
            raise EfquantError("resume needs the directory holding last.pt", field="out_dir")
        return cls(out, recipe, writes)

    @property
    def last(self) -> Path | None:
        return self.out / "last.pt" if self.out is not None else None

    def check_free_space(self, student: nn.Module, cfg: FinetuneConfig) -> None:
        if self.out is not None and self.writes:
            check_free_space(self.out, student, cfg)

    def load_last(self) -> dict[str, Any] | None:
        """The checkpoint to resume from, or None when there is none yet."""
        if self.last is None or not self.last.is_file():
            return None
        state = load_checkpoint(self.last, self.recipe)
        self.last_good = state["step"]
        return state

    def load_best_weights(self) -> dict[str, Tensor] | None:
        if self.out is None or not (self.out / "best.pt").is_file():
            return None
        return torch.load(self.out / "best.pt", map_location="cpu", weights_only=True)["model"]

    def save_last(self, run: RunState, student: nn.Module, optim: Optim, loss_fn: nn.Module,
                  best: BestWeights) -> None:
        if self.last is None or not self.writes:
            return
        kept = f"the previous {self.last.name} (step {self.last_good}) is intact" if self.last_good is not None \
            else "no checkpoint was written yet"
        save({
            "format": CHECKPOINT_FORMAT, "recipe_hash": resume_hash(self.recipe), "step": run.step,
            "epoch": run.epoch, "batch_in_epoch": run.batch_in_epoch, "sampler_epoch": run.epoch,
            "model": student.state_dict(), **optim.state_dict(), "loss": loss_fn.state_dict(), "rng": rng_state(),
            "bad_total": run.bad_total, "history": run.history, "best": best.summary(),
        }, self.last, "fine-tune checkpoint", kept + "; free some space, then continue with resume")
        self.last_good = run.step

    def save_best(self, best: BestWeights) -> None:
        if self.out is None:
            return
        save({"format": CHECKPOINT_FORMAT, "model": best.state, "step": best.step, "metric": best.metric,
              "metrics": best.metrics}, self.out / "best.pt", "best checkpoint", "the previous best.pt is intact")

    def last_good_text(self) -> str | None:
        """``last.pt (step N)`` for error messages, or None when this run has no checkpoint to offer."""
        return f"{self.last} (step {self.last_good})" if self.last_good is not None else None
