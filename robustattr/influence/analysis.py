"""What influence scores are used for (Koh & Liang 2017, section 5): checking training labels, and finding the
training points behind a set of test errors.

- `found_curve`: rank training points by a signal (self-influence, training loss, gradient norm, random) and
  check them in that order: the fraction of the planted label flips found after checking each fraction of the
  training set, its values at chosen fractions and the area under the curve (1 - p/2 for a perfect ranking with
  flip rate p, 0.5 for a random one).
- `error_influence`: the summed influence of every training point on the loss of a set of test points (the
  model's test errors, with their true labels); the most negative are the training points most responsible for
  the errors (domain mismatch: a group of unusual, mislabelled training points), optionally summed by group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from robustattr.errors import ConfigError
from robustattr.influence.base import Influence

FRACTIONS = (0.05, 0.1, 0.2, 0.3)


def random_signal(n: int, seed: int) -> torch.Tensor:
    """A seeded random ranking of ``n`` points (the baseline of label checking)."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def found_curve(signal: torch.Tensor, flipped: torch.Tensor, fractions: Sequence[float] = FRACTIONS) -> dict:
    """Check training points in decreasing order of ``signal`` (ties in index order); ``flipped``: boolean (n,)
    marking the planted flips. Returns ``found_at`` (fraction of flips found after checking each fraction, as
    ``{"5": ..., "10": ...}`` in percent), ``auc`` (area under found vs checked, both in [0, 1]) and ``curve``
    (found after checking 0, 1%, ..., 100%)."""
    signal = torch.as_tensor(signal, dtype=torch.float64)
    flipped = torch.as_tensor(flipped, dtype=torch.bool)
    if signal.shape != flipped.shape or signal.dim() != 1:
        raise ConfigError(f"found_curve: signal {tuple(signal.shape)} and flips {tuple(flipped.shape)} differ")
    total = int(flipped.sum())
    if total == 0:
        raise ConfigError("found_curve: no flipped labels to find")
    n = len(signal)
    order = torch.sort(-signal, stable=True).indices
    found = torch.cat([torch.zeros(1, dtype=torch.float64), flipped[order].double().cumsum(0) / total])  # k = 0..n
    checked = torch.arange(n + 1, dtype=torch.float64) / n
    auc = float(torch.trapezoid(found, checked))

    def at(fraction: float) -> float:
        return float(found[min(n, round(fraction * n))])

    return {
        "found_at": {f"{100 * f:g}": at(f) for f in fractions},
        "auc": auc,
        "curve": [at(p / 100) for p in range(101)],
    }


def error_influence(influence: Influence, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The influence of every training point on the summed loss of the test points ``(x, y)`` (true labels), (n,):
    negative = the training point raises their loss (harmful), positive = lowers it. Ranked ascending, the first
    are the training points most responsible for those errors."""
    if len(x) == 0:
        raise ConfigError("error_influence: no test points given")
    return influence.scores(x, y).values.sum(0)


def dataset_groups(dataset: Dataset) -> tuple[torch.Tensor, list[str]] | None:
    """The group of each sample, when the dataset carries one: a ``groups`` attribute (a sequence of integers,
    one per sample) with optional ``group_names``, seen through `Subset`, `ConcatDataset` and wrappers that keep
    the wrapped dataset as ``.dataset`` (planted label noise). None when the data has no groups."""
    if isinstance(dataset, Subset):
        inner = dataset_groups(dataset.dataset)
        return None if inner is None else (inner[0][torch.as_tensor(dataset.indices, dtype=torch.long)], inner[1])
    if isinstance(dataset, ConcatDataset):
        parts = [dataset_groups(d) for d in dataset.datasets]
        if any(p is None for p in parts):
            return None
        names = parts[0][1]
        return torch.cat([p[0] for p in parts]), names
    groups = getattr(dataset, "groups", None)
    if groups is None:
        inner = getattr(dataset, "dataset", None)
        return dataset_groups(inner) if isinstance(inner, Dataset) else None
    groups = torch.as_tensor(groups, dtype=torch.long)
    if groups.dim() != 1 or len(groups) != len(dataset):
        raise ConfigError(
            f"{type(dataset).__name__}.groups: one integer per sample expected, got {tuple(groups.shape)}"
        )
    count = int(groups.max()) + 1 if len(groups) else 0
    names = list(getattr(dataset, "group_names", None) or [f"group {g}" for g in range(count)])
    if len(names) < count:
        raise ConfigError(f"{type(dataset).__name__}.group_names: {len(names)} names for {count} groups")
    return groups, names


def group_sums(values: torch.Tensor, groups: torch.Tensor, names: Sequence[str]) -> list[dict]:
    """Per group: its name, size, the summed and the mean value of its members, sorted by the mean (ascending: the
    group most harmful per member first; a large group's sum grows with its size alone)."""
    out = []
    for g, name in enumerate(names):
        members = values[groups == g]
        if len(members):
            out.append({"group": name, "size": len(members), "sum": float(members.sum()),
                        "mean": float(members.mean())})  # fmt: skip
    return sorted(out, key=lambda r: r["mean"])
