"""Graph rewrite: put Brevitas quant layers and activation quant points into a traced backbone.

We rewrite the torch.fx graph ourselves instead of calling ``brevitas.graph.quantize``: that
function needs Brevitas's deprecated tracer and hangs on graphs traced by plain torch.fx
(toolkits.md §1.2), and its PReLU mapping drops the learned slopes. What comes from Brevitas is
what it is good at: the QuantConv2d/QuantLinear layers, the quantizer injectors and the PTQ
algorithms (see :mod:`efquant_fx.graph.ptq`).

Activation quant points (each an :class:`~efquant_fx.graph.modules.ActQuant`) sit on *tensors*,
not on consumers: a tensor read by several layers is quantized once, as int8 hardware stores it.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from efquant_fx.errors import CoverageError, EfquantError
from efquant_fx.graph.modules import ActQuant, QuantPReLU
from efquant_fx.graph.quantizers import quant_layer_from
from efquant_fx.recipe import LayerRule, QuantConfig

_COMPUTE_TYPES = {"Conv2d": nn.Conv2d, "Linear": nn.Linear}
_ADD_TARGETS = (operator.add, operator.iadd, torch.add)


@dataclass
class LayerPlan:
    """What the recipe asks for one compute layer (decided before anything is rewritten)."""

    name: str
    type: str
    quantize: bool
    weight_bits: int | None
    act_bits: int | None
    reason: str = ""


def get_module(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name)


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def layer_roles(gm: fx.GraphModule) -> dict[str, set[str]]:
    """The roles recipe rules select by, for every Conv2d/Linear the graph calls (execution order)."""
    names = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"
             and isinstance(get_module(gm, n.target), nn.Conv2d | nn.Linear)]
    names = list(dict.fromkeys(names))
    roles: dict[str, set[str]] = {name: set() for name in names}
    for name in names:
        m = get_module(gm, name)
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels:
            roles[name].add("depthwise")
        elif isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size == (1, 1):
            roles[name].add("pointwise")
    if names:
        roles[names[0]].add("stem")
        roles[names[-1]].add("embedding")
    return roles


def _selects(rule: LayerRule, name: str, roles: set[str]) -> bool:
    return rule.role in roles if rule.role else bool(re.search(str(rule.match), name))


def plan_layers(gm: fx.GraphModule, cfg: QuantConfig) -> dict[str, LayerPlan]:
    """Resolve include/exclude and per-layer rules for every Conv2d/Linear the graph calls; a rule
    that selects no layer is an error (a keep-list written for another backbone must not pass silently)."""
    wanted = tuple(_COMPUTE_TYPES[t] for t in cfg.layer_types)
    plans: dict[str, LayerPlan] = {}
    all_roles = layer_roles(gm)
    for name, roles in all_roles.items():
        module = get_module(gm, name)
        kind = type(module).__name__
        if not isinstance(module, wanted):
            plans[name] = LayerPlan(name, kind, False, None, None, f"{kind} not in quant.layer_types")
            continue
        rule = next((r for r in cfg.layers if _selects(r, name, roles)), None)
        excluded = next((p for p in cfg.exclude if re.search(p, name)), None)
        if excluded is not None:
            plans[name] = LayerPlan(name, kind, False, None, None, f"quant.exclude '{excluded}'")
        elif rule is not None and rule.skip:
            plans[name] = LayerPlan(name, kind, False, None, None, f"quant.layers {rule.selector} skip")
        else:
            wb = rule.weight_bits if rule and rule.weight_bits else cfg.weight_bits
            ab = rule.act_bits if rule and rule.act_bits else cfg.act_bits
            reason = f"quant.layers {rule.selector}" if rule else "default"
            plans[name] = LayerPlan(name, kind, True, wb, ab, reason)
    unused = [i for i, r in enumerate(cfg.layers) if not any(_selects(r, n, ro) for n, ro in all_roles.items())]
    if unused and cfg.enabled:
        i = unused[0]
        raise EfquantError(f"{cfg.layers[i].selector} selects none of the model's {len(plans)} conv/linear layers "
                           f"(first: {', '.join(list(plans)[:3])}); fix the rule or use a role selector",
                           field=f"quant.layers[{i}]")
    return plans


def _is_residual_add(node: fx.Node) -> bool:
    is_add = (node.op == "call_function" and node.target in _ADD_TARGETS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )
    if not is_add or len(node.args) < 2:
        return False
    a, b = node.args[0], node.args[1]
    return all(isinstance(x, fx.Node) and x.op != "get_attr" for x in (a, b))


def conv_output(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The tensor an int8 conv kernel writes: the conv's own output, or its BatchNorm's when the
    conv feeds only a BatchNorm (which integer deployment folds into the conv)."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module" and isinstance(
            get_module(gm, users[0].target), nn.BatchNorm2d):
        return users[0]
    return node


def _point_name(gm: fx.GraphModule, producer: fx.Node) -> str:
    base = producer.target if producer.op == "call_module" else producer.name
    base = re.sub(r"[^0-9a-zA-Z_]", "_", str(base))
    name, i = f"{base}_act_quant", 1
    while hasattr(gm, name):
        i += 1
        name = f"{base}_act_quant{i}"
    return name


def quantize_graph(gm: fx.GraphModule, cfg: QuantConfig) -> dict[str, LayerPlan]:
    """Rewrite ``gm`` in place; returns the per-layer plan it followed.

    Activation quant points start in ``quant`` mode with a placeholder range: run
    :func:`efquant_fx.graph.calibrate.calibrate` before using the model.
    """
    plans = plan_layers(gm, cfg)
    points: dict[fx.Node, int] = {}

    def mark(node: object, bits: int) -> None:
        if isinstance(node, fx.Node) and node.op != "get_attr":
            points[node] = max(points.get(node, 0), bits)

    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            module = get_module(gm, node.target)
            plan = plans.get(node.target)
            if plan is not None and plan.quantize:
                set_module(gm, node.target, quant_layer_from(
                    module, plan.weight_bits, cfg.weight_symmetric,
                    cfg.weight_granularity == "per_channel", cfg.weight_estimator,
                ))
                if "compute_input" in cfg.act_points:
                    mark(node.args[0], plan.act_bits)
                if "compute_output" in cfg.act_points and isinstance(module, nn.Conv2d):
                    mark(conv_output(gm, node), plan.act_bits)
            elif isinstance(module, nn.PReLU):
                slope_bits = cfg.act_bits if cfg.quantize_prelu_slopes else None
                set_module(gm, node.target, QuantPReLU(module, slope_bits))
                if "prelu" in cfg.act_points:
                    mark(node, cfg.act_bits)
        elif _is_residual_add(node) and "residual_add" in cfg.act_points:
            mark(node, cfg.act_bits)
        elif node.op == "output" and "output" in cfg.act_points:
            mark(node.args[0], cfg.act_bits)

    for producer, bits in points.items():
        name = _point_name(gm, producer)
        gm.add_submodule(name, ActQuant(bits, cfg.act_symmetric, cfg.observer, cfg.percentile))
        with gm.graph.inserting_after(producer):
            point = gm.graph.call_module(name, (producer,))
        producer.replace_all_uses_with(point, delete_user_cb=lambda user, p=point: user is not p)
    gm.graph.lint()
    gm.recompile()
    check_coverage(gm, plans, cfg)
    return plans


def _quantized_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    src = node.args[0]
    return (
        isinstance(src, fx.Node) and src.op == "call_module" and isinstance(get_module(gm, src.target), ActQuant)
    )


def check_coverage(gm: fx.GraphModule, plans: dict[str, LayerPlan], cfg: QuantConfig) -> None:
    """Fail loudly when the rewritten graph quantizes less than the recipe asked for.

    PT2E on an autocast-wrapped insightface model quantizes 1 of 22 layers while the output still
    looks right (cosine 0.9998): a silently unquantized graph must never pass.
    """
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    problems = []
    expected = {name for name, p in plans.items() if p.quantize}
    present = {name for name, m in gm.named_modules() if isinstance(m, QuantWeightBiasInputOutputLayer)}
    missing = sorted(expected - present)
    if missing:
        problems.append(f"{len(missing)} layer(s) asked for but not quantized: {', '.join(missing[:5])}")
    if "compute_input" in cfg.act_points:
        unquantized = [
            n.target for n in gm.graph.nodes
            if n.op == "call_module" and n.target in expected and not _quantized_input(gm, n)
        ]
        if unquantized:
            problems.append(f"{len(unquantized)} layer input(s) not quantized: {', '.join(unquantized[:5])}")
    if not expected and cfg.enabled:
        problems.append("no Conv2d/Linear layer was found to quantize (is the model traced into?)")
    if problems:
        raise CoverageError("quantization coverage check failed: " + "; ".join(problems), field="quant")

