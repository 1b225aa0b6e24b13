"""Random numbers that belong to samples, not to batches.

A seed is ``None`` (the global generator: fresh numbers on every call, what training objectives want), an ``int``
(one private generator for the whole batch: the same numbers on every call of the same batch) or a tuple of ints,
one per row of the batch. With a tuple, row ``i`` draws every random number it uses (random starts, random
targets, random signs, the noise of SmoothGrad-like attributions) from its own generator seeded with
``seed[i]``, so a sample's result does not depend on the batch it is in, on its position there, or on the
process that attacked it: the audit seeds each sample from its index (`robustattr.audit.AuditData.seeds`), which
is what lets it deal samples to any number of processes and batch them as each device likes with the same
numbers.

`SampleGenerator` holds the per-row generators; `uniform`, `normal` and `integers` draw from whichever kind of
generator they are given (the sample axis is ``dim``), `derive` turns a seed into an independent one for a
sub-stream (per member, per round, per step), row by row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch

Seed = Union[int, tuple[int, ...], None]  # noqa: UP007 - also a runtime value for jsonargparse-free callers

_MASK = (1 << 64) - 1


def mix(*parts: int) -> int:
    """An int in [0, 2^63) determined by ``parts`` (any ints) and statistically independent for different parts
    (numpy's SeedSequence hash)."""
    state = np.random.SeedSequence([int(p) & _MASK for p in parts]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def is_per_sample(seed: Any) -> bool:
    return isinstance(seed, tuple | list)


def derive(seed: Seed, *salt: int) -> Seed:
    """An independent seed for a sub-stream named by ``salt``: per row for a per-sample seed."""
    if seed is None:
        return None
    if is_per_sample(seed):
        return tuple(mix(s, *salt) for s in seed)
    return mix(seed, *salt)


def offset(seed: Seed, k: int) -> Seed:
    """``seed + k``, row by row for a per-sample seed (another draw of a seeded method's noise)."""
    if is_per_sample(seed):
        return tuple(int(s) + k for s in seed)
    return None if seed is None else int(seed) + k


def select(seed: Seed, rows: torch.Tensor | Sequence[int] | None) -> Seed:
    """The seeds of ``rows`` of a per-sample seed (an int or None is shared by every row)."""
    if rows is None or not is_per_sample(seed):
        return seed
    index = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
    return tuple(seed[i] for i in index)


class SampleGenerator:
    """One ``torch.Generator`` per row of a batch (seeded with ``seeds[i]``, on ``device``)."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu", _generators=None) -> None:
        self.seeds = tuple(int(s) for s in seeds)
        self.device = torch.device(device)
        self.generators = (
            _generators
            if _generators is not None
            else [torch.Generator(device=self.device).manual_seed(s) for s in self.seeds]
        )

    def __len__(self) -> int:
        return len(self.seeds)

    def rows(self, index: torch.Tensor | Sequence[int]) -> SampleGenerator:
        """The generators of ``index`` (the same objects: drawing from the result advances them)."""
        index = index.tolist() if isinstance(index, torch.Tensor) else list(index)
        return SampleGenerator([self.seeds[i] for i in index], self.device, [self.generators[i] for i in index])

    def _draw(self, fn, shape: Sequence[int], dim: int) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        dim = dim % len(shape)
        if shape[dim] != len(self):
            raise ValueError(f"a per-sample draw of shape {shape} needs {shape[dim]} generators along dim {dim}, "
                             f"got {len(self)}")  # fmt: skip
        row = shape[:dim] + shape[dim + 1 :]
        return torch.stack([fn(row, g) for g in self.generators], dim=dim)

    def rand(self, shape: Sequence[int], dtype: torch.dtype | None = None, dim: int = 0) -> torch.Tensor:
        return self._draw(lambda s, g: torch.rand(s, generator=g, device=self.device, dtype=dtype), shape, dim)

    def randn(self, shape: Sequence[int], dtype: torch.dtype | None = None, dim: int = 0) -> torch.Tensor:
        return self._draw(lambda s, g: torch.randn(s, generator=g, device=self.device, dtype=dtype), shape, dim)

    def randint(self, low: int, high: int, shape: Sequence[int], dim: int = 0) -> torch.Tensor:
        return self._draw(lambda s, g: torch.randint(low, high, s, generator=g, device=self.device), shape, dim)


Generator = Union[torch.Generator, SampleGenerator, None]  # noqa: UP007


def generator_for(device: torch.device | str, seed: Seed) -> Generator:
    """None for the global RNG (fresh numbers on every call, reproducible under ``seed_everything``), a private
    ``torch.Generator`` for an int seed (the same numbers on every call), a `SampleGenerator` for one seed per
    row."""
    if seed is None:
        return None
    if is_per_sample(seed):
        return SampleGenerator(seed, device)
    return torch.Generator(device=device).manual_seed(int(seed))


def uniform(shape, generator: Generator, device, dtype: torch.dtype | None = None, dim: int = 0) -> torch.Tensor:
    """U[0, 1) of ``shape``; with a `SampleGenerator`, row ``i`` along ``dim`` from generator ``i``."""
    if isinstance(generator, SampleGenerator):
        return generator.rand(shape, dtype, dim).to(device)
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)


def normal(shape, generator: Generator, device, dtype: torch.dtype | None = None, dim: int = 0) -> torch.Tensor:
    """N(0, 1) of ``shape``; with a `SampleGenerator`, row ``i`` along ``dim`` from generator ``i``."""
    if isinstance(generator, SampleGenerator):
        return generator.randn(shape, dtype, dim).to(device)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def integers(low: int, high: int, shape, generator: Generator, device, dim: int = 0) -> torch.Tensor:
    """Integers in [low, high) of ``shape``; with a `SampleGenerator`, row ``i`` along ``dim`` from generator
    ``i``."""
    if isinstance(generator, SampleGenerator):
        return generator.randint(low, high, shape, dim).to(device)
    return torch.randint(low, high, tuple(shape), generator=generator, device=device)
