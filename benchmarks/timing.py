"""Timing shared by the benchmark scripts, through torch.utils.benchmark.Timer (which synchronises CUDA around each
measurement); the process's thread count is kept (Timer's default is one thread)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from torch.utils import benchmark


def median_seconds(fn: Callable[[], object], repeats: int = 3, warmup: bool = True) -> float:
    """The median wall time in seconds of ``repeats`` calls of ``fn``, after one warm-up call (lazy initialisation,
    cuDNN autotuning) unless ``warmup`` is off."""
    if warmup:
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return statistics.median(timer.timeit(1).median for _ in range(max(1, repeats)))
