"""Pruning, the second compression kind next to quantization: global magnitude and channel pruning.

Two kinds, both in place:

* :func:`prune_unstructured` zeroes the smallest weights across all selected layers (one global
  L1 threshold, ``torch.nn.utils.prune``). Shapes stay; the zeros only pay off with sparse kernels or
  compression, but it combines freely with quantization.
* :func:`prune_channels` removes whole channels with torch-pruning, so conv widths, BN/PReLU sizes,
  parameter count and MACs really drop. The embedding (model output) width and the 3 input channels
  stay.

``exclude`` patterns are regular expressions matched with :func:`re.search` against module qualified
names (``layer1.0.conv1``, ``layers.1.layers.0``): anchor them (``^fc$``) when a bare name would also
match deeper modules. A pattern that matches a container excludes everything inside it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from efquant_fx.errors import EfquantError

_PRUNABLE = (nn.Conv2d, nn.Linear)
_IMPORTANCE_P = {"l1": 1, "l2": 2}


@dataclass(frozen=True)
class LayerPruneInfo:
    """One conv/linear layer before and after pruning; widths are out/in channels (or features)."""

    name: str
    type: str
    params_before: int
    params: int
    zeros: int
    out_before: int
    out_after: int
    in_before: int
    in_after: int
    excluded: bool = False

    @property
    def sparsity(self) -> float:
        """Fraction of this layer's weight entries that are exactly zero."""
        return self.zeros / self.params if self.params else 0.0

    @property
    def shrunk(self) -> bool:
        """Whether channel pruning made this layer narrower on either side."""
        return self.out_after < self.out_before or self.in_after < self.in_before


# ------------------------------------------------------------------------------------------ helpers


def count_params(model: nn.Module) -> int:
    """Number of parameter entries (shared parameters once); a pruning mask does not shrink it."""
    return sum(p.numel() for p in model.parameters())


def _weight(module: nn.Module) -> Tensor:
    """The weight the layer computes with: ``weight_orig * weight_mask`` while a mask is attached.

    ``module.weight`` is only refreshed by the next forward, so after an optimizer step it is stale.
    """
    if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
        return module.weight_orig.detach() * module.weight_mask
    return module.weight.detach()


def _widths(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels, module.in_channels
    w = _weight(module)
    return (w.shape[0], w.shape[1]) if w.dim() > 1 else (w.shape[0], 1)


def sparsity_report(model: nn.Module, types: tuple[type[nn.Module], ...] = _PRUNABLE) -> dict[str, float]:
    """Fraction of exactly-zero weight entries per conv/linear layer (masks applied), by qualified name."""
    return {
        name: float((_weight(m) == 0).sum()) / _weight(m).numel()
        for name, m in model.named_modules()
        if isinstance(m, types) and getattr(m, "weight", None) is not None
    }


def _excluded_modules(model: nn.Module, exclude: Iterable[str]) -> set[nn.Module]:
    """Modules whose qualified name matches a pattern (``re.search``), with everything inside them."""
    patterns = []
    for pattern in exclude:
        try:
            patterns.append(re.compile(pattern))
        except re.error as exc:
            raise EfquantError(f"invalid regular expression {pattern!r}: {exc}", field="exclude") from None
    named = [(n, m) for n, m in model.named_modules() if n]
    out: set[nn.Module] = set()
    for pattern in patterns:
        hits = [m for n, m in named if pattern.search(n)]
        if not hits:
            raise EfquantError(f"pattern {pattern.pattern!r} matches no module name", field="exclude")
        for hit in hits:
            out.update(hit.modules())
    return out


def _check_fraction(value: float, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise EfquantError(f"must be a number in [0, 1), got {value!r}", field=field)


def _is_masked(module: nn.Module) -> bool:
    return any(isinstance(h, torch_prune.BasePruningMethod) for h in module._forward_pre_hooks.values())


# ------------------------------------------------------------------------------------ unstructured


def prune_unstructured(
    model: nn.Module,
    sparsity: float,
    *,
    include_types: tuple[type[nn.Module], ...] = _PRUNABLE,
    exclude: Sequence[str] = (),
    keep_masks: bool = True,
) -> list[LayerPruneInfo]:
    """Mask the globally smallest |weights| so that ``sparsity`` of the selected weights are zero.

    One threshold over all selected layers (``global_unstructured`` + ``L1Unstructured``), so layers
    with small weights lose more; exclude a layer that must stay dense. ``sparsity`` is the target
    for the whole selection counting weights masked by earlier calls, so calling again with a higher
    value prunes further and a lower one changes nothing. With ``keep_masks`` the mask stays as a
    re-parametrisation (``weight = weight_orig * weight_mask``) and fine-tuning cannot revive pruned
    weights; :func:`make_pruning_permanent` bakes it in.
    """
    _check_fraction(sparsity, "sparsity")
    if not isinstance(include_types, tuple) or not all(isinstance(t, type) for t in include_types):
        raise EfquantError(
            f"expected a tuple of module classes, got {include_types!r}", field="include_types"
        )
    excluded = _excluded_modules(model, exclude)
    named = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, include_types) and isinstance(getattr(m, "weight", None), (nn.Parameter, Tensor))
    ]
    selected = [(n, m) for n, m in named if m not in excluded]
    if not selected:
        raise EfquantError("no layer left to prune (check include_types and exclude)", field="include_types")

    total = sum(_weight(m).numel() for _, m in selected)
    already = sum(int((m.weight_mask == 0).sum()) for _, m in selected if hasattr(m, "weight_mask"))
    # An int amount is taken from the still-unmasked entries, so the target counts earlier masks.
    amount = max(round(sparsity * total) - already, 0)
    if amount:
        torch_prune.global_unstructured(
            [(m, "weight") for _, m in selected], pruning_method=torch_prune.L1Unstructured, amount=amount
        )
    if not keep_masks:
        make_pruning_permanent(model)

    infos = []
    for n, m in named:
        w = _weight(m)
        out_w, in_w = _widths(m)
        infos.append(
            LayerPruneInfo(
                name=n, type=type(m).__name__, params_before=w.numel(), params=w.numel(),
                zeros=int((w == 0).sum()), out_before=out_w, out_after=out_w, in_before=in_w, in_after=in_w,
                excluded=m in excluded,
            )
        )
    return infos


def make_pruning_permanent(model: nn.Module) -> list[str]:
    """Bake masks into the weights so the state dict has plain ``weight`` keys again; returns the layers.

    Needed before saving for the insightface layout, exporting, or channel pruning.
    """
    done = []
    for name, module in model.named_modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                torch_prune.remove(module, hook._tensor_name)
                done.append(name)
    return done


# -------------------------------------------------------------------------------------- structured


def _embedding_head(model: nn.Module, example_input: Tensor) -> list[nn.Module]:
    """The leaf modules from the last conv/linear to run up to the output, found by one forward.

    Keeping their output width keeps the embedding dimension (512-d stays 512-d).
    """
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
        for m in model.modules()
        if not list(m.children())
    ]
    try:
        with torch.no_grad():
            model(example_input)
    except Exception as exc:  # the model's own shape errors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EfquantError(
            f"example input of shape {list(example_input.shape)} does not run through the model: {first}",
            field="example_input",
        ) from None
    finally:
        for h in hooks:
            h.remove()
    seen: list[nn.Module] = []
    for m in order:
        if m not in seen:
            seen.append(m)
    last = max((i for i, m in enumerate(seen) if isinstance(m, _PRUNABLE)), default=None)
    return [] if last is None else seen[last:]


def _pruner_class(tp) -> type:
    """torch-pruning's MetaPruner, but ``round_to`` never rounds a layer down to zero channels.

    Stock torch-pruning rounds the kept width down, and a layer rounded to 0 is then silently left
    whole (ratio 0.9, round_to 64: 128 -> 12 -> 0 -> 128); here it keeps ``round_to`` channels.
    """

    class _Pruner(tp.pruner.MetaPruner):
        def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
            kept = current_channels - n_pruned
            kept = max(kept - kept % round_to, min(round_to, current_channels))
            return max(current_channels - kept, 0)

    return _Pruner


def _check_channel_args(model: nn.Module, ratio: float, example_input: Tensor, round_to: int,
                        importance: str) -> None:
    _check_fraction(ratio, "ratio")
    if importance not in _IMPORTANCE_P:
        known = ", ".join(_IMPORTANCE_P)
        raise EfquantError(f"unknown importance {importance!r}; known: {known}", field="importance")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise EfquantError(f"must be an integer >= 1, got {round_to!r}", field="round_to")
    if not isinstance(example_input, Tensor):
        raise EfquantError(f"expected a tensor, got {type(example_input).__name__}", field="example_input")
    masked = [n for n, m in model.named_modules() if _is_masked(m)]
    if masked:
        raise EfquantError(
            f"{len(masked)} layers carry unstructured pruning masks (first: {masked[0]}); "
            "call make_pruning_permanent(model) first",
            field="model",
        )


def prune_channels(
    model: nn.Module,
    ratio: float,
    example_input: Tensor,
    *,
    exclude: Sequence[str] = (),
    round_to: int = 1,
    importance: str = "l1",
    keep_embedding: bool = True,
) -> list[LayerPruneInfo]:
    """Remove the ``ratio`` least important channels of every prunable group, shrinking the model.

    torch-pruning traces ``example_input`` once to find coupled channels: residual adds prune the
    same channels in every block of a stage, and the 512x7x7 -> fc flatten removes the matching 49
    fc columns per channel. Importance is the L1 (or L2) norm of each channel group. Layers matched
    by ``exclude`` keep their output width; with ``keep_embedding`` so does the embedding head (last
    conv/linear and what follows), and the 3 input channels are never pruned. Each layer keeps
    ``int(C * (1 - ratio))`` channels, rounded down to a multiple of ``round_to`` (but at least
    ``round_to``).

    Grouped convs (1 < groups < channels, e.g. MobileFaceNet's ``layers.1``, 128 ch in 64 groups)
    are pruned in whole per-group slots: the same slot leaves every group, so with 2 channels per
    group the conv and its producer go 128 -> 64 at any ratio in (0, 0.5]; exclude both
    (``^layers\\.[01]\\.``) to keep them. With ``round_to > 1`` torch-pruning leaves them whole.

    Works on a ``torch.fx.GraphModule`` too, and the result still traces. The state dict no longer
    fits the unpruned architecture: save the module itself. Modules stay the same objects.
    """
    import torch_pruning as tp

    _check_channel_args(model, ratio, example_input, round_to, importance)
    excluded = _excluded_modules(model, exclude)

    modes = {m: m.training for m in model.modules()}
    model.eval()  # tracing runs forwards: keep BN statistics and dropout untouched
    try:
        head = _embedding_head(model, example_input)
        ignored = set(excluded)
        if keep_embedding:
            ignored.update(head)
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _PRUNABLE)]
        before = {m: (m.weight.numel(), *_widths(m)) for _, m in layers}
        if ratio > 0:
            pruner = _pruner_class(tp)(
                model,
                example_input,
                importance=tp.importance.MagnitudeImportance(p=_IMPORTANCE_P[importance]),
                pruning_ratio=float(ratio),
                ignored_layers=[m for m in model.modules() if m in ignored],
                round_to=round_to if round_to > 1 else None,
            )
            pruner.step()
    finally:
        for m, training in modes.items():
            m.training = training

    infos = []
    for n, m in layers:
        params_before, out_before, in_before = before[m]
        out_after, in_after = _widths(m)
        infos.append(
            LayerPruneInfo(
                name=n, type=type(m).__name__, params_before=params_before, params=m.weight.numel(),
                zeros=int((m.weight == 0).sum()), out_before=out_before, out_after=out_after,
                in_before=in_before, in_after=in_after, excluded=m in ignored,
            )
        )
    return infos


def summarize(infos: Sequence[LayerPruneInfo]) -> dict[str, float]:
    """Totals over a prune result: weight entries before/after, zeros, and overall sparsity."""
    before = sum(i.params_before for i in infos)
    after = sum(i.params for i in infos)
    zeros = sum(i.zeros for i in infos)
    return {
        "params_before": before,
        "params": after,
        "zeros": zeros,
        "sparsity": zeros / after if after else 0.0,
        "kept": after / before if before else math.nan,
    }
