"""MobileFaceNet in insightface arcface_torch's ``mbf`` layout (state-dict compatible)."""

from __future__ import annotations

import torch
from torch import nn

from efquant_fx.models.registry import register_model


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


class ConvBlock(nn.Module):
    """conv -> BN -> PReLU."""

    def __init__(self, in_c: int, out_c: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, groups=groups, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(out_c),
            nn.PReLU(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """conv -> BN, no activation."""

    def __init__(self, in_c: int, out_c: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 project, optionally residual."""

    def __init__(self, in_c: int, out_c: int, residual: bool = False, kernel=(3, 3), stride=(2, 2),
                 padding=(1, 1), groups: int = 1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, groups, kernel=(1, 1)),
            ConvBlock(groups, groups, groups=groups, kernel=kernel, padding=padding, stride=stride),
            LinearBlock(groups, out_c, kernel=(1, 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    def __init__(self, c: int, num_block: int, groups: int, kernel=(3, 3), stride=(1, 1), padding=(1, 1)):
        super().__init__()
        self.layers = nn.Sequential(
            *[DepthWise(c, c, True, kernel, stride, padding, groups) for _ in range(num_block)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv head: 7x7 dw conv -> BN -> flatten -> linear -> BatchNorm1d."""

    def __init__(self, embedding_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(512, 512, groups=512, kernel=(7, 7)),
            Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    def __init__(self, num_features: int = 512, blocks=(1, 4, 6, 2), scale: int = 2):
        super().__init__()
        c = 64 * scale
        self.layers = nn.ModuleList([ConvBlock(3, c, kernel=(3, 3), stride=(2, 2), padding=(1, 1))])
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c, c, kernel=(3, 3), stride=(1, 1), padding=(1, 1), groups=64))
        else:
            self.layers.append(Residual(c, blocks[0], groups=128))
        self.layers.extend([
            DepthWise(c, c, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=128),
            Residual(c, blocks[1], groups=128),
            DepthWise(c, 2 * c, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=256),
            Residual(2 * c, blocks[2], groups=256),
            DepthWise(2 * c, 2 * c, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=512),
            Residual(2 * c, blocks[3], groups=256),
        ])
        self.conv_sep = ConvBlock(2 * c, 512, kernel=(1, 1))
        self.features = GDC(num_features)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


@register_model("mobilefacenet", "insightface MobileFaceNet (mbf, 0.45 GMACs), 112x112 RGB -> 512-d")
def mobilefacenet(num_features: int = 512) -> MobileFaceNet:
    return MobileFaceNet(num_features=num_features)


@register_model("mobilefacenet_large", "insightface MobileFaceNet-large (mbf_large), 112x112 RGB -> 512-d")
def mobilefacenet_large(num_features: int = 512) -> MobileFaceNet:
    return MobileFaceNet(num_features=num_features, blocks=(2, 8, 12, 4), scale=4)
