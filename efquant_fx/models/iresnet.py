"""ArcFace "LResNet-E-IR" backbones in insightface arcface_torch's layout.

Module names and tensor shapes match ``arcface_torch/backbones/iresnet.py`` so that an official
``backbone.pth`` loads with ``strict=True``. The ``fp16`` autocast wrapper of the original is left
out: efquant-fx traces the graph and chooses precision itself.
"""

from __future__ import annotations

import torch
from torch import nn

from efquant_fx.models.registry import register_model

BN_EPS = 1e-5


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus identity; no activation after the add."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=BN_EPS)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + identity


class IResNet(nn.Module):
    """IResNet trunk with the "E" head: BN -> flatten -> dropout -> fc(25088->d) -> BatchNorm1d."""

    fc_scale = 7 * 7

    def __init__(self, layers: list[int], dropout: float = 0.0, num_features: int = 512):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=BN_EPS)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1])
        self.layer3 = self._make_layer(256, layers[2])
        self.layer4 = self._make_layer(512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(512 * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=BN_EPS)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, 1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=BN_EPS),
        )
        layers = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


_DEPTHS = {
    "arcface_r18": [2, 2, 2, 2],
    "arcface_r34": [3, 4, 6, 3],
    "arcface_r50": [3, 4, 14, 3],
    "arcface_r100": [3, 13, 30, 3],
    "arcface_r200": [6, 26, 60, 6],
}


def _factory(layers: list[int]):
    def build(dropout: float = 0.0, num_features: int = 512) -> IResNet:
        return IResNet(layers, dropout=dropout, num_features=num_features)

    return build


for _name, _layers in _DEPTHS.items():
    register_model(_name, f"insightface iresnet{_name.split('_r')[1]} (ArcFace), 112x112 RGB -> 512-d")(
        _factory(_layers)
    )
