"""WideResNet (Zagoruyko & Komodakis 2016); WRN-28-10 is the CIFAR model of Madry et al. and TRADES."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustattr.errors import ConfigError
from robustattr.models.resnet_cifar import CifarNetwork, PreActBlock


class WideResNet(CifarNetwork):
    """WRN-depth-widen_factor; the defaults give WRN-28-10 (36.5M parameters)."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, dropout: float = 0.0, **common: Any) -> None:
        if (depth - 4) % 6 != 0:
            raise ConfigError(f"WideResNet: depth must be 6n+4 (16, 22, 28, 34, 40, ...), got {depth}")
        super().__init__(**common)  # num_classes, in_channels, activation, mean, std: see CifarNetwork
        activation, num_classes = self.activation, self.num_classes
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(self.in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, c_in = [], widths[0]
        for stage, c_out in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(PreActBlock(c_in, c_out, 2 if (stage > 0 and j == 0) else 1, activation, dropout))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.BatchNorm2d(c_in), activation(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.stem(self.normalize(x)))))
