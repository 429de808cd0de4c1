"""The recipe's ``device`` as a torch device: ``auto`` takes CUDA when present."""

from __future__ import annotations

import torch

from efquant_fx.errors import EfquantError


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise EfquantError("device 'cuda' asked for but CUDA is not available", field="device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
