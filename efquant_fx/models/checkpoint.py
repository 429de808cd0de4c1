"""Loading insightface-layout checkpoints safely and strictly."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from efquant_fx.errors import EfquantError

_SHOW = 5


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``backbone.pth`` / ``model.pt`` with ``weights_only=True``.

    Accepts a plain state dict or arcface_torch's ``checkpoint_gpu_*.pt`` (``state_dict_backbone``),
    and strips a DDP ``module.`` prefix. A pickle that tries to run code is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise EfquantError("checkpoint file not found", source=str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe pickle"
        raise EfquantError(
            f"refused to load: not a plain weights file (weights_only=True rejected it: {first})",
            source=str(path),
        ) from None
    except Exception as exc:  # zip/format errors from torch
        raise EfquantError(f"cannot read checkpoint ({type(exc).__name__}: {exc})", source=str(path)) from None
    if isinstance(obj, dict) and "state_dict_backbone" in obj:
        obj = obj["state_dict_backbone"]
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EfquantError("expected a state dict (name -> tensor)", source=str(path))
    return {k.removeprefix("module."): v for k, v in obj.items()}


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Problems that would stop a strict load: missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and own[k].shape != state[k].shape
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:_SHOW])}{more}")
    return problems


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load ``path`` into ``model`` with ``strict=True`` or raise one clear error."""
    state = read_state_dict(path)
    problems = check_state_dict(model, state)
    if problems:
        raise EfquantError(
            f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems), source=str(path)
        )
    model.load_state_dict(state, strict=True)
    return model
