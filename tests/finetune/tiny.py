"""A tiny face-net-shaped model (conv-BN-PReLU stages, linear, BN1d embedding) for fast loop tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyFaceNet(nn.Module):
    def __init__(self, width: int = 8, emb: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.PReLU(cout))

        self.body = nn.Sequential(stage(3, width), stage(width, 2 * width), stage(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(2 * width * 16, emb)
        self.features = nn.BatchNorm1d(emb)
        with torch.no_grad():
            for p in self.parameters():
                if p.ndim > 1:
                    p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
            self.fc.bias.zero_()
            # BN statistics as if estimated on data: non-trivial targets for data-free synthesis
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(torch.flatten(self.pool(self.body(x)), 1)))


def tiny() -> TinyFaceNet:
    """Factory for ``--model tests.finetune.tiny:tiny``."""
    return TinyFaceNet()
