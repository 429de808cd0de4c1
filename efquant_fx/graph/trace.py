"""Symbolic tracing with torch.fx, with errors that say which module failed and how to fix it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from efquant_fx.errors import EfquantError


class _FaceTracer(fx.Tracer):
    """A plain torch.fx tracer that remembers the module it was inside when tracing failed."""

    def __init__(self, leaf_names: Iterable[str] = (), leaf_types: tuple[type, ...] = ()):
        super().__init__()
        self.leaf_names = set(leaf_names)
        self.leaf_types = leaf_types
        self.failed_module: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # innermost module wins
                self.failed_module = (self.path_of_module(m), type(m).__name__)
            raise


AUTO_LEAVES = "efquant_auto_leaves"  # GraphModule.meta key: modules made leaves because they did not trace
MAX_AUTO_LEAVES = 16


def trace(model: nn.Module, leaf_modules: Iterable[str] = (), auto_leaf: bool = True) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule without touching its code.

    ``leaf_modules`` are qualified module names or class names kept opaque (called, not traced into);
    their insides are then neither quantized nor pruned. With ``auto_leaf``, a submodule that torch.fx
    cannot trace (a shape ``assert``, data-dependent control flow) becomes a leaf by itself and the trace
    is retried; ``gm.meta[AUTO_LEAVES]`` lists those as ``(name, type, reason)``. The choice is
    deterministic, so a reload traces the same graph.
    """
    if isinstance(model, fx.GraphModule) and not leaf_modules:
        return model
    leaf_modules = list(leaf_modules)
    names = {n for n, _ in model.named_modules()}
    leaf_names = [m for m in leaf_modules if m in names]
    leaf_types = tuple(
        {type(mod) for _, mod in model.named_modules() if type(mod).__name__ in leaf_modules}
    )
    auto: list[tuple[str, str, str]] = []
    while True:
        tracer = _FaceTracer(leaf_names, leaf_types)
        try:
            graph = tracer.trace(model)
            break
        except Exception as exc:  # torch.fx raises TraceError, TypeError, RuntimeError, ... on dynamic code
            op = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            where, kind = tracer.failed_module or ("<top level forward>", type(model).__name__)
            if auto_leaf and tracer.failed_module and where not in leaf_names and len(auto) < MAX_AUTO_LEAVES:
                auto.append((where, kind, f"{type(exc).__name__}: {op}"))
                leaf_names.append(where)
                continue
            hint = f"model.leaf_modules: ['{where}']" if tracer.failed_module else "model.leaf_modules: [...]"
            raise EfquantError(
                f"torch.fx cannot trace module '{where}' ({kind}): {type(exc).__name__}: {op}. "
                f"Mark it as a leaf so it is called as a whole (and left in float): {hint}",
                field="model",
            ) from None
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta[AUTO_LEAVES] = auto
    return gm


def auto_leaf_notes(gm: fx.GraphModule) -> list[str]:
    """One note per module the trace had to keep opaque (its insides stay float)."""
    return [f"torch.fx could not trace '{name}' ({kind}: {reason}); it runs as one float module "
            f"(name it in model.leaf_modules to say so, or make its code traceable to quantize inside it)"
            for name, kind, reason in gm.meta.get(AUTO_LEAVES, [])]


def module_types(gm: fx.GraphModule) -> dict[str, type]:
    return {name: type(m) for name, m in gm.named_modules()}


def example_input(batch: int = 2, size: int = 112, device: torch.device | str = "cpu") -> torch.Tensor:
    """A face-shaped input in the standard (x-127.5)/127.5 range, for shape checks."""
    return torch.rand(batch, 3, size, size, device=device) * 2 - 1
