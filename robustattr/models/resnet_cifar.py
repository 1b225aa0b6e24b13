"""ResNet-18 and pre-activation ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), as used throughout the
CIFAR robustness literature (He et al. 2016a/b; the Madry/TRADES/CURE CIFAR baselines)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from robustattr.models.layers import ActivationFactory, Normalize

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _shortcut(c_in: int, c_out: int, stride: int, with_bn: bool) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    conv = nn.Conv2d(c_in, c_out, 1, stride, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out)) if with_bn else conv


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, activation: ActivationFactory) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = activation()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride, with_bn=True)
        self.act2 = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """The pre-activation basic block (He et al. 2016b); with ``dropout`` between its convolutions, the wide
    ResNet's block (Zagoruyko & Komodakis 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int, activation: ActivationFactory, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.act1 = activation()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = activation()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = _shortcut(c_in, c_out, stride, with_bn=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        shortcut = self.shortcut(out) if not isinstance(self.shortcut, nn.Identity) else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(self.act2(self.bn2(out))))
        return out + shortcut


class CifarNetwork(nn.Module):
    """What the CIFAR networks share: their constructor's data arguments, and the input normalisation inside the
    network (so attacks and attributions see [0, 1] images). Subclasses build their layers from
    ``self.in_channels``, ``self.activation`` and ``self.num_classes``."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        activation: ActivationFactory = nn.ReLU,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.activation = activation
        self.normalize = Normalize(mean, std)


class _CifarResNet(CifarNetwork):
    """The CIFAR ResNets: a subclass names its block, whether it is pre-activation, and its blocks per stage; the
    constructor (and so every config's ``init_args``) is the same for all of them."""

    block: type[nn.Module]
    preact: bool
    blocks_per_stage: Sequence[int] = (2, 2, 2, 2)

    def __init__(self, width: int = 64, **common: Any) -> None:
        super().__init__(**common)  # num_classes, in_channels, activation, mean, std: see CifarNetwork
        in_channels, activation, num_classes = self.in_channels, self.activation, self.num_classes
        stem: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)]
        if not self.preact:
            stem += [nn.BatchNorm2d(width), activation()]
        self.stem = nn.Sequential(*stem)
        stages, c_in = [], width
        for i, n in enumerate(self.blocks_per_stage):
            c_out = width * 2**i
            for j in range(n):
                stages.append(self.block(c_in, c_out, 2 if (i > 0 and j == 0) else 1, activation))
                c_in = c_out
        self.stages = nn.Sequential(*stages)
        head: list[nn.Module] = [nn.BatchNorm2d(c_in), activation()] if self.preact else []
        self.head = nn.Sequential(*head, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.stages(self.stem(self.normalize(x)))))


class ResNet18(_CifarResNet):
    """ResNet-18 for CIFAR (11.2M parameters)."""

    block = BasicBlock
    preact = False


class PreActResNet18(_CifarResNet):
    """Pre-activation ResNet-18 for CIFAR (He et al. 2016b), the usual backbone of fast adversarial training."""

    block = PreActBlock
    preact = True
