"""The graph rewrite as a list of small passes, built from the recipe by one function.

Each pass is an object with ``apply(gm, ctx) -> gm`` (Brevitas' ``Transform`` shape). Structural
passes (pruning, BN folding, cross-layer equalization, quantizer insertion) shape the graph;
data passes (activation equalization, BN re-estimation, calibration, GPTQ, bias correction) only
change tensors the state dict carries. :func:`efquant_fx.compress` runs them all on calibration
images; :func:`efquant_fx.load_result` and :func:`efquant_fx.export.load_packed` replay the same
list without data, which skips the data passes, so a saved state dict always meets the graph it
came from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from efquant_fx.graph import calibrate as calib
from efquant_fx.graph import ptq
from efquant_fx.graph.quantize import quantize_graph
from efquant_fx.recipe import QuantConfig, Recipe, RoundingSpec

log = logging.getLogger(__name__)


@dataclass
class PassContext:
    """What passes share: the device, calibration batches (``None`` on replay) and what they report."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batches: Sequence[torch.Tensor] | None = None
    example: torch.Tensor | None = None
    plans: dict[str, Any] = field(default_factory=dict)
    calibration: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    reconstruction: list[dict[str, Any]] = field(default_factory=list)  # per-layer rows of learned rounding
    quant: QuantConfig | None = None  # the quant config with a bit budget resolved into layer rules
    budget: dict[str, Any] | None = None  # what the budget search measured and chose
    progress: Callable[[str], None] | None = None  # one line per step of long passes
    stage: str = ""  # the pass running now, for error messages (out of memory)

    @property
    def replay(self) -> bool:
        return self.batches is None


class GraphPass:
    """One rewrite step. ``needs_data`` passes are skipped on replay: their effect is in the state dict."""

    name: ClassVar[str] = "pass"
    label: ClassVar[str] = "the graph rewrite"
    needs_data: ClassVar[bool] = False

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "config")
        return f"{type(self).__name__}({fields})"


@dataclass(repr=False)
class PruneUnstructured(GraphPass):
    sparsity: float
    exclude: Sequence[str] = ()
    name: ClassVar[str] = "prune"
    label: ClassVar[str] = "the graph rewrite (pruning, equalization)"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        from efquant_fx.graph import prune

        prune.prune_unstructured(gm, self.sparsity, exclude=self.exclude)
        return gm


@dataclass(repr=False)
class PruneChannels(GraphPass):
    """Removes channels; ``ctx.example`` only lets it trace (kept widths follow from the ratio)."""

    sparsity: float
    exclude: Sequence[str] = ()
    name: ClassVar[str] = "prune"
    label: ClassVar[str] = "the graph rewrite (pruning, equalization)"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        from efquant_fx.graph import prune
        from efquant_fx.graph.trace import trace

        example = ctx.example[:2] if ctx.example is not None else torch.zeros(2, 3, 112, 112, device=ctx.device)
        prune.prune_channels(gm, self.sparsity, example, exclude=self.exclude)
        return gm if isinstance(gm, fx.GraphModule) else trace(gm)


class FoldBatchNorm(GraphPass):
    name: ClassVar[str] = "fold_batchnorm"
    label: ClassVar[str] = "the graph rewrite (pruning, equalization)"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        return ptq.fold_batchnorm(gm)


@dataclass(repr=False)
class CrossLayerEqualization(GraphPass):
    iterations: int
    name: ClassVar[str] = "cross_layer_equalization"
    label: ClassVar[str] = "the graph rewrite (pruning, equalization)"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        return ptq.cross_layer_equalization(gm, self.iterations)


@dataclass(repr=False)
class PReLUEqualization(GraphPass):
    """Channel ranges equalized across PReLU (:mod:`efquant_fx.graph.equalize`); weights carry it."""

    alpha: float
    name: ClassVar[str] = "prelu_equalization"
    label: ClassVar[str] = "the graph rewrite (pruning, equalization)"
    needs_data: ClassVar[bool] = True

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        from efquant_fx.graph.equalize import equalize_prelu_ranges

        chains = equalize_prelu_ranges(gm, ctx.batches or [], ctx.device, self.alpha)
        ctx.notes.append(f"PReLU equalization: {len(chains)} conv -> PReLU -> conv chain(s) rescaled "
                         f"({sum(c.depthwise for c in chains)} into depthwise convs)")
        return gm


@dataclass(repr=False)
class ActivationEqualization(GraphPass):
    """SmoothQuant-style; it only rescales weights, which a reloaded state dict carries."""

    alpha: float
    name: ClassVar[str] = "act_equalization"
    label: ClassVar[str] = "the graph rewrite (pruning, equalization)"
    needs_data: ClassVar[bool] = True

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        return ptq.activation_equalization(gm, self.alpha, ctx.batches or [], ctx.device)


@dataclass(repr=False)
class InsertQuantizers(GraphPass):
    """Brevitas quant layers and activation points, checked against the plan (coverage gate)."""

    config: QuantConfig
    name: ClassVar[str] = "quantize"
    label: ClassVar[str] = "the graph rewrite (pruning, equalization)"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        ctx.plans = quantize_graph(gm, ctx.quant or self.config)
        return gm.to(ctx.device)


@dataclass(repr=False)
class BitBudget(GraphPass):
    """Mixed precision by measured sensitivity (:mod:`efquant_fx.graph.budget`), decided before the
    quantizers go in; the saved recipe holds the result as layer rules, so replay needs no data."""

    config: QuantConfig
    name: ClassVar[str] = "bit_budget"
    label: ClassVar[str] = "the bit-budget search"
    needs_data: ClassVar[bool] = True

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        from efquant_fx.graph.budget import search_budget

        ctx.quant, ctx.budget = search_budget(gm, self.config, ctx.batches or [], ctx.device)
        b, a = ctx.budget["base"], ctx.budget["after"]
        ctx.notes.append(
            f"bit budget: {len(ctx.budget['raised'])} layer weight/input choice(s) raised to "
            f"{ctx.budget['high_bits']} bits; average weight bits "
            f"{b['avg_weight_bits']} -> {a['avg_weight_bits']}, input bits {b['avg_act_bits']} -> {a['avg_act_bits']}")
        return gm


class ReestimateBatchNorm(GraphPass):
    """BN statistics under quantized weights, before activation ranges are taken."""

    name: ClassVar[str] = "bn_reestimate"
    label: ClassVar[str] = "BatchNorm re-estimation"
    needs_data: ClassVar[bool] = True

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        with calib.points_disabled(gm):
            ptq.reestimate_batchnorm(gm, ctx.batches or [], ctx.device)
        return gm


class Calibrate(GraphPass):
    name: ClassVar[str] = "calibrate"
    label: ClassVar[str] = "calibration"
    needs_data: ClassVar[bool] = True

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        ctx.calibration = calib.calibrate(gm, ctx.batches or [], ctx.device)
        return gm


@dataclass(repr=False)
class GPTQ(GraphPass):
    exclude: Sequence[str] = ("^fc$",)
    act_order: bool = True
    name: ClassVar[str] = "gptq"
    label: ClassVar[str] = "GPTQ"
    needs_data: ClassVar[bool] = True

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        skipped = ptq.gptq(gm, ctx.batches or [], self.exclude, self.act_order, ctx.device)
        if skipped:
            ctx.notes.append(f"GPTQ skipped {', '.join(skipped)} (ptq.gptq_exclude)")
        return gm


@dataclass(repr=False)
class LearnedRounding(GraphPass):
    """AdaRound-style rounding learned layer by layer (:mod:`efquant_fx.graph.reconstruct`)."""

    spec: RoundingSpec
    name: ClassVar[str] = "learned_rounding"
    label: ClassVar[str] = "learned rounding"
    needs_data: ClassVar[bool] = True

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        from efquant_fx.graph.reconstruct import RoundingConfig, reconstruct_rounding

        cfg = RoundingConfig(**self.spec.model_dump())
        rows = reconstruct_rounding(gm, ctx.batches or [], ctx.device, cfg, progress=ctx.progress)
        done = [r for r in rows if "skipped" not in r]
        skipped = [r["layer"] for r in rows if "skipped" in r]
        ctx.notes.append(f"learned rounding: {len(done)} layer(s), {self.spec.iters} steps each on "
                         f"{sum(b.shape[0] for b in ctx.batches or [])} images"
                         + (f"; round-to-nearest kept for {', '.join(skipped[:5])}" if skipped else ""))
        ctx.reconstruction = rows
        return gm


class BiasCorrection(GraphPass):
    name: ClassVar[str] = "bias_correction"
    label: ClassVar[str] = "bias correction"
    needs_data: ClassVar[bool] = True

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        ptq.bias_correction(gm, ctx.batches or [], ctx.device)
        return gm


def build_passes(recipe: Recipe) -> list[GraphPass]:
    """The recipe's rewrite, in order: prune, fold BN, equalize, insert quantizers, then the data passes."""
    passes: list[GraphPass] = []
    prune = recipe.prune
    if prune is not None and prune.kind == "unstructured":
        passes.append(PruneUnstructured(prune.sparsity, tuple(prune.exclude)))
    elif prune is not None and prune.kind == "channels":
        passes.append(PruneChannels(prune.sparsity, tuple(prune.exclude)))
    q = recipe.quant
    if q is None or not q.enabled:
        return passes
    if q.batchnorm == "fold":
        passes.append(FoldBatchNorm())
    if recipe.ptq.cross_layer_equalization:
        passes.append(CrossLayerEqualization(recipe.ptq.cross_layer_equalization))
    if recipe.ptq.prelu_equalization:
        passes.append(PReLUEqualization(recipe.ptq.prelu_equalization))
    if recipe.ptq.act_equalization:
        passes.append(ActivationEqualization(recipe.ptq.act_equalization))
    if q.budget is not None:
        passes.append(BitBudget(q))
    passes.append(InsertQuantizers(q))
    if q.batchnorm == "reestimate":
        passes.append(ReestimateBatchNorm())
    passes.append(Calibrate())
    if recipe.ptq.gptq:
        passes.append(GPTQ(tuple(recipe.ptq.gptq_exclude), recipe.ptq.gptq_act_order))
    if recipe.ptq.learned_rounding is not None:
        passes.append(LearnedRounding(recipe.ptq.learned_rounding))
    if recipe.ptq.bias_correction:
        passes.append(BiasCorrection())
    return passes


def run_passes(gm: fx.GraphModule, passes: Sequence[GraphPass], ctx: PassContext) -> fx.GraphModule:
    """Apply ``passes`` in order (data passes only when ``ctx`` has batches), timing each one; a log
    line as each starts, so a piped run of a long GPTQ or calibration says what it is doing."""
    todo = [p for p in passes if not (p.needs_data and ctx.replay)]
    for i, p in enumerate(todo, 1):
        log.info("graph pass %d/%d: %s", i, len(todo), p.name)
        ctx.stage = p.label
        t0 = time.perf_counter()
        gm = p.apply(gm, ctx)
        ctx.timings[p.name] = ctx.timings.get(p.name, 0.0) + time.perf_counter() - t0
    return gm


def replay_passes(gm: fx.GraphModule, recipe: Recipe,
                  device: torch.device | str = "cpu") -> tuple[fx.GraphModule, dict[str, Any]]:
    """The recipe's structural passes without data: the graph a saved state dict was taken from."""
    ctx = PassContext(device=torch.device(device))
    gm = run_passes(gm, build_passes(recipe), ctx)
    return gm, ctx.plans
