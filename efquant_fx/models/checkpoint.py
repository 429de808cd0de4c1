"""Loading insightface-layout checkpoints safely and strictly."""

from __future__ import annotations

import pickle
import pickletools
from pathlib import Path

import torch
from torch import nn

from efquant_fx.errors import EfquantError

_SHOW = 5


_TORCH_GLOBALS = ("torch.", "collections.OrderedDict", "builtins.set", "_codecs.encode", "numpy.")


def _code_globals(path: str | Path) -> list[str]:
    """Globals a plain-pickle file names that a weights file never does (for the message only)."""
    try:
        data = Path(path).read_bytes()
        found, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # not a plain pickle (zip, garbage): nothing to name
        return []
    return [g for g in found if not g.startswith(_TORCH_GLOBALS)]


def load_error(exc: BaseException, path: str | Path, what: str = "checkpoint") -> EfquantError:
    """One line for a failed ``torch.load(..., weights_only=True)``.

    torch's own message is a paragraph that suggests retrying with ``weights_only=False`` (which would
    run the file's code); we keep only its reason, and say plainly when the file names code to run.
    """
    text = str(exc).strip()
    if isinstance(exc, pickle.UnpicklingError):
        noise = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(noise)]
        reason = (lines[0] if lines else "unsupported content").removeprefix("WeightsUnpickler error:").strip()
        code = _code_globals(path)
        if code or "GLOBAL" in reason:
            named = f"it names {', '.join(code[:3])}" if code else reason
            return EfquantError(f"refused to load: the {what} would run code when unpickled, it is not a plain "
                                f"weights file ({named})", source=str(path))
        return EfquantError(f"refused to load: the {what} is not a plain torch weights file ({reason})",
                            source=str(path))
    first = (text.splitlines() or [""])[0].split(". ")[0]
    return EfquantError(f"cannot read {what} ({type(exc).__name__}: {first})", source=str(path))


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
    except Exception as exc:  # unpickling refusals, zip/format errors from torch
        raise load_error(exc, path) from None
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
