"""A small CNN for 8x8 digits (and any small image): four 3x3 convolutions, no pooling layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from robustattr.models.layers import ActivationFactory, Normalize


class SmallCNN(nn.Module):
    """conv(w) - conv(w) - conv(2w, stride 2) - conv(2w) - adaptive average pool to 2x2 - linear.

    About 60k parameters at width 32. The defaults of ``mean``/``std`` are the pixel statistics of the digits
    dataset (0.305 / 0.376 on the [0, 1] scale). Strided convolutions instead of max-pooling keep every
    non-linearity an activation module, so `swap_activations` turns the whole network smooth.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 32,
        activation: ActivationFactory = nn.ReLU,
        batch_norm: bool = True,
        mean: Sequence[float] = (0.305,),
        std: Sequence[float] = (0.376,),
    ) -> None:
        super().__init__()
        self.num_classes = num_classes

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            return [*layers, activation()]

        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            *block(in_channels, width, 1),
            *block(width, width, 1),
            *block(width, 2 * width, 2),
            *block(2 * width, 2 * width, 1),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))
