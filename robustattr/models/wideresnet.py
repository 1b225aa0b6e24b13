"""WideResNet (Zagoruyko & Komodakis 2016); WRN-28-10 is the CIFAR model of Madry et al. and TRADES."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from robustattr.errors import ConfigError
from robustattr.models.layers import ActivationFactory, Normalize
from robustattr.models.resnet_cifar import CIFAR10_MEAN, CIFAR10_STD


class WideBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float, activation: ActivationFactory) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.act1 = activation()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = activation()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.equal = c_in == c_out and stride == 1
        self.shortcut = nn.Identity() if self.equal else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        shortcut = x if self.equal else self.shortcut(out)
        out = self.conv2(self.dropout(self.act2(self.bn2(self.conv1(out)))))
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-widen_factor; the defaults give WRN-28-10 (36.5M parameters)."""

    def __init__(
        self,
        num_classes: int = 10,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
        in_channels: int = 3,
        activation: ActivationFactory = nn.ReLU,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ConfigError(f"WideResNet: depth must be 6n+4 (16, 22, 28, 34, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, c_in = [], widths[0]
        for stage, c_out in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(WideBlock(c_in, c_out, 2 if (stage > 0 and j == 0) else 1, dropout, activation))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.BatchNorm2d(c_in), activation(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.stem(self.normalize(x)))))
