"""Building blocks shared by every architecture: input normalisation, and activations given as factories
(`Callable[[], nn.Module]`): a class such as ``torch.nn.ReLU`` or, in YAML,
``{class_path: torch.nn.Softplus, init_args: {beta: 10}}``; each layer calls the factory for its own instance.
What each activation is, and its smooth twin, lives in `robustattr.models.activations`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from robustattr.models.activations import ActivationFactory

__all__ = ["ActivationFactory", "Normalize"]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; the first layer of every robustattr network, so that inputs, epsilons
    and clamps all live in [0, 1] pixel space. A single value broadcasts over all channels."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if mean_t.numel() != std_t.numel():
            raise ValueError(f"Normalize: mean has {mean_t.numel()} values but std has {std_t.numel()}")
        if (std_t <= 0).any():
            raise ValueError(f"Normalize: std must be positive, got {list(std)}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computed in at least fp32, returned in the network's own dtype (its buffers'): a network converted to
        bf16 (``bf16-true``) takes fp32 images, so attacks keep their iterates in fp32, where an epsilon of
        8/255 is resolved, and gradients flow back to them in fp32."""
        compute = torch.promote_types(x.dtype, torch.float32)
        out = (x.to(compute) - self.mean.to(compute)) / self.std.to(compute)
        return out.to(self.mean.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
