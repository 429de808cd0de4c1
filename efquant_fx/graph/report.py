"""Per-layer table and model size: what a user checks first after compressing."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from efquant_fx.graph.modules import ActQuant


def float_size_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and floating buffer at its own dtype (the state dict on disk)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def compressed_size_bytes(model: nn.Module) -> int:
    """Deployable size of a dense file: quantized weights at their bit width, everything else at fp32.

    Unstructured sparsity does not shrink a dense file, so a pruned weight counts at its full size,
    once: torch's pruning masks (``*_mask`` buffers) are bookkeeping, not part of the deployed model.
    """
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    total = 0
    quant_weights: set[int] = set()
    for m in model.modules():
        if isinstance(m, QuantWeightBiasInputOutputLayer):
            bits = int(m.quant_weight().bit_width)
            total += (m.weight.numel() * bits + 7) // 8
            scale = m.quant_weight().scale
            total += scale.numel() * 4
            quant_weights.add(id(m.weight))
    for p in model.parameters():
        if id(p) not in quant_weights:
            total += p.numel() * p.element_size()
    total += sum(b.numel() * b.element_size() for name, b in model.named_buffers()
                 if b.is_floating_point() and not name.endswith("_mask"))
    return total


def layer_table(model: nn.Module, plans: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per compute layer (Conv2d/Linear/Brevitas layer), PReLU, BN and quant point."""
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    from efquant_fx.graph.modules import QuantPReLU

    rows = []
    for name, m in model.named_modules():
        row: dict[str, Any] | None = None
        if isinstance(m, QuantWeightBiasInputOutputLayer):
            plan = (plans or {}).get(name)
            row = dict(layer=name, type=type(m).__name__, params=m.weight.numel(),
                       weight_bits=int(m.quant_weight().bit_width),
                       act_bits=plan.act_bits if plan else None, status="quantized",
                       reason=plan.reason if plan else "")
        elif isinstance(m, nn.Conv2d | nn.Linear):
            plan = (plans or {}).get(name)
            weight = m.weight
            zeros = int((weight == 0).sum())
            row = dict(layer=name, type=type(m).__name__, params=weight.numel(), weight_bits=None,
                       act_bits=None, status="float", reason=plan.reason if plan else "")
            if zeros:
                row["sparsity"] = zeros / weight.numel()
        elif isinstance(m, QuantPReLU):
            row = dict(layer=name, type="PReLU", params=m.weight.numel(), weight_bits=m.slope_bits,
                       act_bits=None, status="slopes kept", reason="")
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            row = dict(layer=name, type=type(m).__name__, params=m.num_features * 2, weight_bits=None,
                       act_bits=None, status="float", reason="no conv/linear in front (not foldable)")
        elif isinstance(m, ActQuant):
            row = dict(layer=name, type="ActQuant", params=0, weight_bits=None, act_bits=m.bits,
                       status=m.mode, reason=f"range {m.range[0]:.3g}..{m.range[1]:.3g}" if m.range else "")
        if row is not None:
            rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, int]:
    compute = [r for r in rows if r["type"] in ("Conv2d", "Linear", "QuantConv2d", "QuantLinear")]
    return {
        "compute_layers": len(compute),
        "quantized_layers": sum(r["status"] == "quantized" for r in compute),
        "float_layers": sum(r["status"] == "float" for r in compute),
        "act_quant_points": sum(r["type"] == "ActQuant" for r in rows),
        "float_batchnorms": sum(r["type"].startswith("BatchNorm") for r in rows),
        "prelus": sum(r["type"] == "PReLU" for r in rows),
    }


@torch.no_grad()
def embedding_cosine(reference: nn.Module, model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Cosine between the two models' embeddings of the same inputs (mean and worst)."""
    from efquant_fx.graph.frozen import frozen_quantizers  # needs Brevitas, which this module otherwise does not

    a = torch.nn.functional.normalize(reference(x).float(), dim=1)
    with frozen_quantizers(model):
        b = torch.nn.functional.normalize(model(x).float(), dim=1)
    cos = (a * b).sum(1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "images": int(x.shape[0])}


_MATMUL_FUNCTIONS = {"matmul", "bmm", "baddbmm", "scaled_dot_product_attention", "einsum"}


def _op_kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, nn.Conv2d | nn.Linear) or type(m).__name__ in ("QuantConv2d", "QuantLinear"):
            return "conv" if "Conv" in type(m).__name__ else "linear"
        if isinstance(m, nn.LayerNorm):
            return "layer_norm"
        if isinstance(m, nn.Softmax):
            return "softmax"
        return "opaque module" if any(isinstance(c, nn.Conv2d | nn.Linear) for c in m.modules()) else None
    name = getattr(node.target, "__name__", str(node.target))
    if node.op in ("call_function", "call_method"):
        if name in _MATMUL_FUNCTIONS:
            return "matmul"
        if name in ("softmax", "layer_norm"):
            return name
    return None


def op_coverage(gm: torch.fx.GraphModule) -> dict[str, tuple[int, int]]:
    """``{op kind: (quantized, total)}``: conv/linear layers count when Brevitas layers, matmuls when every
    tensor input comes from an activation quant point; softmax, LayerNorm and opaque (leaf) modules
    that hold conv/linear layers are float here and counted so that a report shows what stayed float."""
    out: dict[str, list[int]] = {}
    for node in gm.graph.nodes:
        kind = _op_kind(gm, node)
        if kind is None:
            continue
        if kind in ("conv", "linear"):
            quantized = type(gm.get_submodule(str(node.target))).__name__.startswith("Quant")
        elif kind == "matmul":
            inputs = [a for a in node.args if isinstance(a, torch.fx.Node)]
            quantized = bool(inputs) and all(a.op == "call_module" and isinstance(
                gm.get_submodule(str(a.target)), ActQuant) for a in inputs)
        else:
            quantized = False
        counts = out.setdefault(kind, [0, 0])
        counts[0] += int(quantized)
        counts[1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def coverage_note(gm: torch.fx.GraphModule) -> str | None:
    """A one-line note when the graph has ops beyond conv/linear (attention, LayerNorm, opaque modules)."""
    cov = op_coverage(gm)
    if set(cov) <= {"conv", "linear"}:
        return None
    return "op coverage (quantized/total): " + ", ".join(f"{k} {q}/{t}" for k, (q, t) in cov.items())
