"""Is the teacher usable? A model whose embeddings are not finite fails here, naming where it overflows.

A zoo backbone with random weights (no ``--weights``) or a wrong checkpoint can overflow to inf/NaN
deep inside (a random iresnet100 does from its third stage): calibration then fails much later with
an observer that "saw no data", and the fidelity reads 0. One forward on a couple of calibration
images, with a hook on every leaf module, names the first module whose output is not finite.
"""

from __future__ import annotations

import torch
from torch import nn

from efquant_fx.errors import EfquantError


@torch.no_grad()
def first_nonfinite_module(model: nn.Module, x: torch.Tensor) -> str | None:
    """The first module (in execution order) whose output holds inf/NaN on ``x``; None if all are finite."""
    bad: list[str] = []

    def hook(name: str):
        def check(_m: nn.Module, _args: tuple, out: object) -> None:
            if not bad and isinstance(out, torch.Tensor) and out.is_floating_point() and not bool(out.isfinite().all()):
                bad.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n and not list(m.children())]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    if bad:
        return bad[0]
    return None if bool(torch.as_tensor(out).isfinite().all()) else "(the output)"


def check_finite_teacher(model: nn.Module, x: torch.Tensor, source: str | None = None) -> None:
    """One-line error if the model's embeddings of ``x`` are not finite."""
    where = first_nonfinite_module(model, x)
    if where is None:
        return
    raise EfquantError(
        f"the float model's outputs are not finite: they overflow to inf/NaN at '{where}' on the first calibration "
        "images; load trained weights (--weights / model.weights) or check that the checkpoint matches the "
        "architecture", source=source, field="model.weights")
