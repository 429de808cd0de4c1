"""Per-channel range equalization across PReLU: every channel uses the whole per-tensor activation grid.

A per-tensor activation quantizer takes its step from the widest channel, so channels with a small
range keep only a few levels. In face backbones the worst case is the PReLU output feeding the 7x7
global depthwise conv (GDC) of MobileFaceNet, whose channel ranges differ by orders of magnitude.
PReLU is positively homogeneous (``prelu(s*x) = s*prelu(x)`` for ``s > 0``, per-channel slopes
unchanged), so channel ``c`` can be scaled by ``s_c`` in the producer (a Conv2d, or the BatchNorm
after it) and by ``1/s_c`` in the consumer conv without changing the float function. Brevitas's
equalization does not treat PReLU as scale-invariant, so it never finds these chains.

With per-channel weight quantization the scaling is free for the producer (each output channel has
its own weight scale) and for a depthwise consumer (likewise); for a dense consumer it shrinks the
input columns of small channels, so ``alpha < 1`` (SmoothQuant's migration strength) balances the two.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

MAX_SCALE = 1e3  # dead channels (range ~0) would otherwise get unbounded scales


@dataclass(frozen=True)
class PReLUChain:
    producer: str  # Conv2d or BatchNorm2d whose output goes only to the PReLU
    prelu: str
    consumer: str  # Conv2d reading only the PReLU output
    depthwise: bool


def _module(gm: fx.GraphModule, node: object) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        return gm.get_submodule(str(node.target))
    return None


def _producer_ok(module: nn.Module | None) -> bool:
    if isinstance(module, nn.BatchNorm2d):
        return module.affine
    return isinstance(module, nn.Conv2d)


def find_prelu_chains(gm: fx.GraphModule) -> list[PReLUChain]:
    """``producer -> PReLU -> consumer conv`` chains with no other reader in between."""
    chains = []
    for node in gm.graph.nodes:
        if not isinstance(_module(gm, node), nn.PReLU) or len(node.users) != 1:
            continue
        producer, consumer = node.args[0], next(iter(node.users))
        cons = _module(gm, consumer)
        if not _producer_ok(_module(gm, producer)) or len(producer.users) != 1 or not isinstance(cons, nn.Conv2d):
            continue
        depthwise = cons.groups == cons.in_channels and cons.groups > 1
        if cons.groups not in (1, cons.in_channels) or (depthwise and cons.out_channels != cons.in_channels) \
                or consumer.args[0] is not node:
            continue
        chains.append(PReLUChain(str(producer.target), str(node.target), str(consumer.target), depthwise))
    return chains


@torch.no_grad()
def _channel_ranges(gm: fx.GraphModule, chains: list[PReLUChain], batches: Iterable[torch.Tensor],
                    device: torch.device | str) -> dict[str, torch.Tensor]:
    ranges: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_module: nn.Module, _inputs: object, out: torch.Tensor) -> None:
            r = out.detach().abs().amax(dim=(0, 2, 3)).float()
            ranges[name] = torch.maximum(ranges[name], r) if name in ranges else r
        return hook

    handles = [gm.get_submodule(c.prelu).register_forward_hook(record(c.prelu)) for c in chains]
    gm.eval()
    try:
        for x in batches:
            gm(x.to(device))
    finally:
        for h in handles:
            h.remove()
    return ranges


@torch.no_grad()
def _rescale(gm: fx.GraphModule, chain: PReLUChain, scale: torch.Tensor) -> None:
    producer, consumer = gm.get_submodule(chain.producer), gm.get_submodule(chain.consumer)
    if isinstance(producer, nn.BatchNorm2d):
        producer.weight.mul_(scale)
        producer.bias.mul_(scale)
    else:
        producer.weight.mul_(scale.view(-1, 1, 1, 1))
        if producer.bias is not None:
            producer.bias.mul_(scale)
    view = (-1, 1, 1, 1) if chain.depthwise else (1, -1, 1, 1)
    consumer.weight.div_(scale.view(view))


def equalize_prelu_ranges(gm: fx.GraphModule, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu",
                          alpha: float = 1.0, dense_alpha: float | None = None) -> list[PReLUChain]:
    """Scale every chain's channels towards the widest one: ``s_c = (R / r_c) ** alpha`` (``dense_alpha``
    for dense consumers, default ``alpha / 2``). The float function is unchanged; returns the chains."""
    chains = find_prelu_chains(gm)
    if not chains:
        return []
    ranges = _channel_ranges(gm, chains, list(batches), device)
    dense_alpha = alpha / 2 if dense_alpha is None else dense_alpha
    for chain in chains:
        r = ranges[chain.prelu]
        widest = r.max()
        if not bool(widest > 0):
            continue
        strength = alpha if chain.depthwise else dense_alpha
        scale = (widest / r.clamp_min(widest / MAX_SCALE)) ** strength
        _rescale(gm, chain, scale.to(gm.get_submodule(chain.consumer).weight.device))
    return chains
