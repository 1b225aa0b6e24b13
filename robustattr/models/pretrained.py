"""Any timm or torchvision architecture by name, with normalisation inside and weights from a local file.

Nothing is downloaded: the architectures are built with random weights, then ``weights`` (a local .pth, .pt,
.ckpt or .safetensors file) is loaded if given. With ``strict_weights=False`` a classifier head of another
size (ImageNet weights, CIFAR head) is left at its fresh initialisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from robustattr.models.activations import ActivationFactory, swap_activations
from robustattr.models.layers import Normalize
from robustattr.models.weights import load_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def disable_fused_attention(model: nn.Module) -> int:
    """Turn off fused scaled-dot-product attention in timm blocks: it has no double backward."""
    count = 0
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
            count += 1
    return count


class _NamedNet(nn.Module):
    def _finish(
        self,
        weights: str | None,
        strict_weights: bool,
        activation: ActivationFactory | None,
    ) -> None:
        if weights:
            load_weights(self.model, weights, strict=strict_weights)
        if activation is not None:
            swap_activations(self.model, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


class TimmNet(_NamedNet):
    """A timm model by name (``resnet50``, ``convnext_tiny``, ``vit_small_patch16_224``, ...).

    ``activation`` replaces every piecewise-linear activation (e.g. ``torch.nn.Softplus`` with a beta);
    ``fused_attn=False`` (the default) keeps attention differentiable twice. ``mean``/``std`` default to the
    model's pretrained configuration in timm. ``model_kwargs`` go to ``timm.create_model`` (``img_size``,
    ``drop_rate``, ...).
    """

    def __init__(
        self,
        name: str,
        num_classes: int = 1000,
        in_channels: int = 3,
        weights: str | None = None,
        strict_weights: bool = True,
        activation: ActivationFactory | None = None,
        fused_attn: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        import timm

        self.num_classes = num_classes
        self.model = timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **(model_kwargs or {})
        )
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        self.normalize = Normalize(mean or cfg.get("mean", IMAGENET_MEAN), std or cfg.get("std", IMAGENET_STD))
        if not fused_attn:
            disable_fused_attention(self.model)
        self._finish(weights, strict_weights, activation)


class TorchvisionNet(_NamedNet):
    """A torchvision classification model by name (``resnet50``, ``wide_resnet50_2``, ``vgg16_bn``, ...)."""

    def __init__(
        self,
        name: str,
        num_classes: int = 1000,
        weights: str | None = None,
        strict_weights: bool = True,
        activation: ActivationFactory | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        from torchvision import models

        self.num_classes = num_classes
        self.model = models.get_model(name, weights=None, num_classes=num_classes)
        self.normalize = Normalize(mean, std)
        self._finish(weights, strict_weights, activation)
