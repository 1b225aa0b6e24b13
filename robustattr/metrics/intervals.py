"""How sure a measured mean is: 95% intervals over the audited samples and paired comparisons of two checkpoints.

- `mean_interval`: the mean over samples (NaN entries are not counted) with a percentile-bootstrap interval
  (`scipy.stats.bootstrap`, seeded, 2000 resamples by default);
- `proportion_interval`: a share of successes with its Wilson score interval (`scipy.stats.binomtest`), the
  interval for accuracies and label-kept rates (it stays inside [0, 1] and is not degenerate at 0 or 1);
- `paired_difference`: two checkpoints measured on the same samples, compared through the bootstrap of the mean
  of their per-sample differences over the samples both count. The difference is resolved only when its interval
  excludes zero; otherwise it reports how many samples would resolve it at the measured spread,
  ``(1.96 sd / |mean difference|)^2``.

An interval belongs to the number it is printed with: a mean over 64 audited images is an estimate, and two
checkpoints whose intervals of a paired difference include zero are not told apart by this audit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats

LEVEL = 0.95
RESAMPLES = 2000
Z = float(stats.norm.ppf(0.5 + LEVEL / 2))  # 1.96


def _array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% interval over ``n`` counted samples (NaN bounds where fewer than two were counted)."""

    mean: float
    ci_low: float
    ci_high: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n}

    @classmethod
    def of(cls, entry: dict[str, Any]) -> Estimate:
        """The estimate a report stored with `as_dict` (JSON nulls read back as NaN)."""

        def number(v: Any) -> float:
            return float("nan") if v is None else float(v)

        return cls(number(entry["mean"]), number(entry["ci_low"]), number(entry["ci_high"]), int(entry["n"]))

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2

    def __str__(self) -> str:
        if not math.isfinite(self.mean):
            return "n/a"
        if not (math.isfinite(self.ci_low) and math.isfinite(self.ci_high)):
            return f"{self.mean:.3f} (n={self.n})"
        return f"{self.mean:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"


def _bootstrap(samples: tuple[np.ndarray, ...], statistic, seed: int, resamples: int, paired: bool = False):
    result = stats.bootstrap(
        samples,
        statistic,
        paired=paired,
        vectorized=True,
        confidence_level=LEVEL,
        n_resamples=resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return float(low), float(high)


def mean_interval(values: Any, seed: int = 0, resamples: int = RESAMPLES) -> Estimate:
    """The mean of ``values`` over its finite entries, with a seeded percentile-bootstrap 95% interval."""
    v = _array(values)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    mean = float(v.mean())
    if n < 2:
        return Estimate(mean, float("nan"), float("nan"), n)
    if np.all(v == v[0]):  # every resample has this mean
        return Estimate(mean, mean, mean, n)
    low, high = _bootstrap((v,), lambda s, axis: s.mean(axis=axis), seed, resamples)
    return Estimate(mean, low, high, n)


def proportion_interval(successes: Any, n: int | None = None) -> Estimate:
    """A share with its Wilson score 95% interval: ``successes`` a count out of ``n``, or per-sample 0/1 values
    (NaN entries not counted)."""
    if n is None:
        v = _array(successes)
        v = v[np.isfinite(v)]
        n, successes = len(v), round(float(v.sum()))
    successes = int(successes)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    interval = stats.binomtest(successes, n).proportion_ci(confidence_level=LEVEL, method="wilson")
    return Estimate(successes / n, float(interval.low), float(interval.high), n)


def statistic_interval(statistic, columns: list[Any], seed: int = 0, resamples: int = RESAMPLES) -> Estimate:
    """A statistic of several per-sample columns of equal length (resampled together, rows are samples):
    ``statistic(*columns, axis)`` must reduce along ``axis`` and ignore NaN entries where it should."""
    arrays = tuple(_array(c) for c in columns)
    n = len(arrays[0])
    value = float(statistic(*[a[None] for a in arrays], axis=-1)[0])
    if n < 2 or not math.isfinite(value):
        return Estimate(value, float("nan"), float("nan"), n)
    low, high = _bootstrap(arrays, statistic, seed, resamples, paired=True)
    return Estimate(value, low, high, n)


def auroc_interval(negatives: Any, positives: Any, seed: int = 0, resamples: int = RESAMPLES) -> Estimate:
    """The area under the ROC curve of a score that should be higher for ``positives`` (the Mann-Whitney U over
    n_pos x n_neg, ties counted half), with a bootstrap 95% interval resampling each group on its own."""
    neg, pos = _array(negatives), _array(positives)
    neg, pos = neg[np.isfinite(neg)], pos[np.isfinite(pos)]
    n = len(neg) + len(pos)
    if len(neg) == 0 or len(pos) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), n)

    def auroc(p: np.ndarray, q: np.ndarray, axis: int) -> np.ndarray:
        return stats.mannwhitneyu(p, q, axis=axis).statistic / (p.shape[axis] * q.shape[axis])

    value = float(auroc(pos, neg, axis=-1))
    if len(neg) < 2 or len(pos) < 2 or np.all(np.r_[neg, pos] == neg[0]):
        return Estimate(value, float("nan"), float("nan"), n)
    low, high = _bootstrap((pos, neg), auroc, seed, resamples)
    return Estimate(value, low, high, n)


def paired_difference(
    a: Any, b: Any, seed: int = 0, higher_is_better: bool = True, resamples: int = RESAMPLES
) -> dict[str, Any]:
    """Mean of ``a - b`` over the samples where both are finite, with its paired-bootstrap 95% interval.

    ``resolved``: the interval excludes zero. ``better``: "a" or "b" (the larger mean when ``higher_is_better``)
    where resolved, else None. ``samples_to_resolve``: where not resolved, the number of samples at which an
    interval of the measured spread would exclude zero, ``ceil((1.96 sd / |d|)^2)`` (None when the measured
    difference is exactly zero)."""
    x, y = _array(a), _array(b)
    if len(x) != len(y):
        raise ValueError(f"paired_difference: {len(x)} and {len(y)} values; pairs need the same samples")
    both = np.isfinite(x) & np.isfinite(y)
    d = x[both] - y[both]
    n = len(d)
    estimate = mean_interval(d, seed, resamples)
    resolved = bool(n >= 2 and (estimate.ci_low > 0 or estimate.ci_high < 0))
    better = None
    if resolved:
        a_larger = estimate.mean > 0
        better = "a" if a_larger == higher_is_better else "b"
    to_resolve = None
    if not resolved and n >= 2 and estimate.mean != 0:
        sd = float(d.std(ddof=1))
        to_resolve = max(n + 1, math.ceil((Z * sd / abs(estimate.mean)) ** 2))
    return {
        "difference": estimate.mean,
        "ci_low": estimate.ci_low,
        "ci_high": estimate.ci_high,
        "samples": n,
        "resolved": resolved,
        "better": better,
        "samples_to_resolve": to_resolve,
    }
