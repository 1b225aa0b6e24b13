"""Networks. Each one takes images in [0, 1], normalises them itself, and exposes ``num_classes``."""

from robustattr.models.activations import (
    PIECEWISE_LINEAR,
    ActivationFactory,
    count_activations,
    is_piecewise_linear,
    needs_smooth_surrogate,
    smooth_twin,
    swap_activations,
)
from robustattr.models.layers import Normalize
from robustattr.models.pretrained import TimmNet, TorchvisionNet, disable_fused_attention
from robustattr.models.resnet_cifar import PreActResNet18, ResNet18
from robustattr.models.small_cnn import SmallCNN
from robustattr.models.weights import load_state_dict_file, load_weights, safe_torch_load
from robustattr.models.wideresnet import WideResNet

__all__ = [
    "PIECEWISE_LINEAR",
    "ActivationFactory",
    "Normalize",
    "PreActResNet18",
    "ResNet18",
    "SmallCNN",
    "TimmNet",
    "TorchvisionNet",
    "WideResNet",
    "count_activations",
    "disable_fused_attention",
    "is_piecewise_linear",
    "load_state_dict_file",
    "load_weights",
    "needs_smooth_surrogate",
    "safe_torch_load",
    "smooth_twin",
    "swap_activations",
]
