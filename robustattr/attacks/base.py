"""What every attack shares: a gradient context that works under ``no_grad`` and ``inference_mode`` and
leaves the model as it found it, and the choice of target classes."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from robustattr.errors import ConfigError, keep_counts
from robustattr.rng import Generator, Seed, integers
from robustattr.rng import generator_for as generator_for  # re-exported: the attacks import it from here

TargetMode = Literal["none", "random", "least_likely", "runner_up"]


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextmanager
def gradient_context(model: nn.Module) -> Iterator[None]:
    """Input gradients available (also inside ``torch.inference_mode`` and ``torch.no_grad``, as in Lightning's
    validate/test), every module in eval mode (BatchNorm statistics frozen, dropout off), parameters not
    requiring grad (autograd then records no weight paths: a BIM step is up to a quarter faster on CPU), and
    each module's mode and each parameter's flag restored on exit. Attacks take gradients with
    ``torch.autograd.grad`` with respect to inputs only, so parameter ``.grad`` is never touched."""
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    model.eval()
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
        for param, requires_grad in flags:
            param.requires_grad_(requires_grad)


def prepare(model: nn.Module, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Fresh copies on the model's device: normal tensors even when the inputs are inference tensors, and in fp32
    when they come in a 16-bit type (bf16 has no room for an 8/255 step near 1: iterates, projections and steps
    stay in fp32, the network casts its input to its own dtype)."""
    device = model_device(model)

    def fresh(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to(device)
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t.clone()

    return [None if t is None else fresh(t) for t in tensors]


def choose_target(
    mode: TargetMode, logits: torch.Tensor, y: torch.Tensor, generator: Generator = None
) -> torch.Tensor | None:
    """Target classes for a targeted attack: a random class other than ``y``, the least-likely class, or the
    runner-up (the most likely class other than ``y``: a semantically near target)."""
    if mode == "none":
        return None
    num_classes = logits.shape[1]
    if mode == "random":
        shift = integers(1, num_classes, y.shape, generator, y.device)
        return (y + shift) % num_classes
    if mode == "least_likely":
        return logits.argmin(dim=1)
    if mode == "runner_up":
        return logits.scatter(1, y[:, None], float("-inf")).argmax(dim=1)
    raise ValueError(f"unknown target mode {mode!r}")


def with_seed(attack, seed: Seed):
    """A shallow copy of ``attack`` with another seed (attacks are stateless between calls): an int for the whole
    batch, or one per row (`robustattr.rng`: each sample's random numbers then depend on its seed only)."""
    other = copy.copy(attack)
    other.seed = seed
    return other


class IterativeAttack:
    """What the iterative attacks (PGD and the explanation attacks) share: a threat model, steps and restarts
    (checked), an optional step size (the default, derived from the radius, is each attack's `step_size`), random
    starts and a seed; `with_eps` gives a copy on a ball of another radius (for epsilon sweeps), whose default
    step size scales with it."""

    def __init__(
        self,
        threat: Any,
        steps: int,
        step_size: float | None,
        restarts: int,
        random_start: bool,
        seed: Seed,
    ) -> None:
        keep_counts(self, steps=steps, restarts=restarts)
        if step_size is not None and step_size <= 0:
            raise ConfigError(f"{type(self).__name__}: step_size must be positive, got {step_size}")
        self.threat = threat
        self._step_size = step_size
        self.random_start = random_start
        self.seed = seed

    def with_eps(self, eps: float):
        other = type(self).__new__(type(self))
        other.__dict__.update(self.__dict__, threat=self.threat.with_eps(eps))
        return other
