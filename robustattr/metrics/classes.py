"""Thin torchmetrics wrappers around `robustattr.metrics.functional`.

Each metric keeps its per-sample values (state reduced with ``cat``, so under DDP every process ends with
all samples) and reports their mean. Fragility metrics take a ``kept`` mask: only samples whose label the
attack kept count (REFERENCE.md section 1), and `LabelKeptRate` reports that share alongside.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from robustattr.metrics import functional as F


class PerSampleMean(Metric):
    """Mean over samples of a per-sample value; NaN values (samples outside the metric's scope) are dropped."""

    full_state_update = False
    higher_is_better: bool | None = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def _add(self, values: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        values = values.detach().float().reshape(-1)
        if keep is not None:
            values = values[keep.reshape(-1).bool()]
        self.values.append(values[~values.isnan()])

    def update(self, values: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        self._add(values, keep)

    def _current(self) -> torch.Tensor:
        # The state is a list of tensors while updating, one concatenated tensor once synced.
        if isinstance(self.values, list) and not self.values:
            return torch.empty(0, device=self.device)
        return dim_zero_cat(self.values)

    def per_sample(self) -> torch.Tensor:
        """Every sample's value; under DDP those of all processes (in process order)."""
        with self.sync_context(should_sync=not self._is_synced):
            return self._current().clone()

    def compute(self) -> torch.Tensor:
        values = self._current()  # compute() runs on the synced state already
        return values.mean() if values.numel() else torch.tensor(float("nan"), device=self.device)


class _MapMetric(PerSampleMean):
    fn: Callable[..., torch.Tensor]

    def scores(self, maps_clean: torch.Tensor, maps_adv: torch.Tensor) -> torch.Tensor:
        return type(self).fn(maps_clean, maps_adv)

    def update(self, maps_clean: torch.Tensor, maps_adv: torch.Tensor, kept: torch.Tensor | None = None) -> None:
        self._add(self.scores(maps_clean, maps_adv), kept)


class TopKIntersection(_MapMetric):
    """Share of the clean map's top-k pixels still in the perturbed map's top-k (higher: more robust).
    ``k=None`` takes the size rule of `default_k` from the maps' height and width."""

    higher_is_better = True

    def __init__(self, k: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.k = k

    def scores(self, maps_clean: torch.Tensor, maps_adv: torch.Tensor) -> torch.Tensor:
        return F.topk_intersection(maps_clean, maps_adv, self.k or F.default_k(*maps_clean.shape[1:]))


class SpearmanCorrelation(_MapMetric):
    higher_is_better = True
    fn = staticmethod(F.spearman)


class KendallTau(_MapMetric):
    higher_is_better = True
    fn = staticmethod(F.kendall_tau)


class CenterShift(_MapMetric):
    """Distance in pixels between the centres of mass of the clean and perturbed maps."""

    higher_is_better = False
    fn = staticmethod(F.center_shift)


class CosineDistance(_MapMetric):
    higher_is_better = False
    fn = staticmethod(F.cosine_distance)


# The one registry of the metrics comparing a clean map with a perturbed one: the names every callback logs
# (``val/frag/<method>/<attack>_<eps>/<name>``) and every audit table and report.json key uses.
MAP_METRICS: dict[str, type[_MapMetric]] = {
    "topk_intersection": TopKIntersection,
    "spearman": SpearmanCorrelation,
    "kendall": KendallTau,
    "center_shift": CenterShift,
    "cosine_distance": CosineDistance,
}


def map_metrics(k: int | None = None) -> dict[str, _MapMetric]:
    """A fresh instance of every map metric by its registered name; ``k`` for the top-k intersection."""
    return {name: cls(k=k) if cls is TopKIntersection else cls() for name, cls in MAP_METRICS.items()}


class LabelKeptRate(PerSampleMean):
    higher_is_better = None

    def update(self, kept: torch.Tensor) -> None:
        self._add(kept.float())


class RobustAccuracy(PerSampleMean):
    higher_is_better = True

    def update(self, logits_adv: torch.Tensor, y: torch.Tensor) -> None:
        self._add(F.robust_accuracy(logits_adv, y))


class AttackSuccessRate(PerSampleMean):
    higher_is_better = False

    def update(
        self,
        pred_clean: torch.Tensor,
        pred_adv: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None = None,
    ) -> None:
        self._add(F.attack_success(pred_clean, pred_adv, y, target))
