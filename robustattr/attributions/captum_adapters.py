"""Captum's attribution methods behind the robustattr call, for evaluation only.

Captum's outputs are not differentiable with respect to the input (its gradient helper never builds a
second-order graph), so these refuse ``create_graph=True``: attacks and penalties use the differentiable
methods of `robustattr.attributions.gradient`. Propagation methods such as DeepLIFT are attacked on the ReLU
network directly, through a differentiable surrogate method, never through these adapters.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from robustattr.attributions.gradient import Attribution, _grad_enabled
from robustattr.errors import ConfigError
from robustattr.rng import is_per_sample


class CaptumAttribution(Attribution):
    """Base adapter: subclasses name the Captum class (``captum_class``, in ``captum.attr``) and the keyword
    arguments of ``attribute``. Captum is imported on first use, not with robustattr."""

    captum_class: str

    @property
    def method(self) -> type:
        import captum.attr

        return getattr(captum.attr, self.captum_class)

    def kwargs(self, x: torch.Tensor) -> dict[str, Any]:
        return {}

    def __call__(
        self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, create_graph: bool = False
    ) -> torch.Tensor:
        if create_graph:
            raise ConfigError(
                f"{type(self).__name__} comes from Captum, whose attributions are not differentiable with respect "
                "to the input: use it for evaluation; attack Saliency, GradientXInput, IntegratedGradients, "
                "SmoothGrad or UniformGradient"
            )
        with _grad_enabled():
            x_in = x.detach().clone().requires_grad_(True)
            return self.method(model).attribute(x_in, target=target.to(x_in.device), **self.kwargs(x_in)).detach()


class DeepLift(CaptumAttribution):
    """DeepLIFT, Rescale rule (Shrikumar et al. 2017), against a constant baseline image (black)."""

    short_name = "deeplift"

    captum_class = "DeepLift"

    def __init__(self, baseline: float = 0.0) -> None:
        super().__init__()
        self.baseline = baseline

    def kwargs(self, x):
        return {"baselines": torch.full_like(x, self.baseline)}


class GradientShap(CaptumAttribution):
    """GradientSHAP (Lundberg & Lee 2017): expected gradients over black and white baselines, seeded."""

    short_name = "gradient_shap"
    stochastic = True

    captum_class = "GradientShap"

    def __init__(self, samples: int = 50, stdevs: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.samples = samples
        self.stdevs = stdevs
        self.seed = seed

    def kwargs(self, x):
        baselines = torch.stack([torch.zeros_like(x[0]), torch.ones_like(x[0])])
        return {"baselines": baselines, "n_samples": self.samples, "stdevs": self.stdevs}

    def __call__(self, model, x, target, create_graph=False):
        if is_per_sample(self.seed):  # Captum draws from the global RNGs: one call per row, each with its seed
            rows = [self._seeded(seed, model, x[i : i + 1], target[i : i + 1], create_graph)
                    for i, seed in enumerate(self.seed)]  # fmt: skip
            return torch.cat(rows)
        return self._seeded(self.seed, model, x, target, create_graph)

    def _seeded(self, seed: int, model, x, target, create_graph):
        # Captum samples from the global torch and numpy RNGs: seed both privately, restore them after.
        devices = [x.device] if x.device.type == "cuda" else []
        numpy_state = np.random.get_state()  # noqa: NPY002 - Captum uses the legacy global RNG
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                np.random.seed(seed % 2**32)  # noqa: NPY002
                return super().__call__(model, x, target, create_graph)
        finally:
            np.random.set_state(numpy_state)  # noqa: NPY002


class Occlusion(CaptumAttribution):
    """Occlusion (Zeiler & Fergus 2014): the score drop when a ``window`` x ``window`` patch is set to
    ``baseline``, sliding by ``stride``."""

    short_name = "occlusion"

    captum_class = "Occlusion"

    def __init__(self, window: int = 4, stride: int = 2, baseline: float = 0.0) -> None:
        super().__init__()
        self.window = window
        self.stride = stride
        self.baseline = baseline

    def kwargs(self, x):
        channels = x.shape[1]
        return {
            "sliding_window_shapes": (channels, self.window, self.window),
            "strides": (channels, self.stride, self.stride),
            "baselines": self.baseline,
        }
