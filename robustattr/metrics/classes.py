"""Thin torchmetrics wrappers around `robustattr.metrics.functional`.

Each metric reports a mean over samples from sum and count states (all-reduced under DDP: a few numbers per
metric whatever the number of samples); ``per_sample=True`` also keeps every sample's value (a ``cat`` state,
gathered under DDP) for `per_sample`. Fragility metrics take a ``kept`` mask: only samples whose label the
attack kept count (REFERENCE.md section 1), and `LabelKeptRate` reports that share alongside.

The map metrics (one registry, `MAP_METRICS`) compare the same pair of maps: `map_collection` builds them as one
torchmetrics `MetricCollection` whose members share one state (one compute group), so a batch is scored once
for all of them, and each member reads its own entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

from robustattr.metrics import functional as F


def _gathered_values(metric: Metric) -> torch.Tensor | None:
    """A metric's per-sample ``values`` state, concatenated (under DDP: every process's, in process order); None
    when nothing was added."""
    if not getattr(metric, "keeps_values", False):
        raise ValueError(f"{type(metric).__name__} keeps no per-sample values: construct it with per_sample=True")
    with metric.sync_context(should_sync=not metric._is_synced):
        # The state is a list of tensors while updating, one concatenated tensor once synced.
        if isinstance(metric.values, list) and not metric.values:
            return None
        return dim_zero_cat(metric.values).clone()


class PerSampleMean(MeanMetric):
    """Mean over samples of a per-sample value; NaN values (samples outside the metric's scope) and samples
    outside ``keep`` are dropped; NaN when no sample counted."""

    full_state_update = False
    higher_is_better: bool | None = None

    def __init__(self, per_sample: bool = False, **kwargs) -> None:
        super().__init__(nan_strategy="ignore", **kwargs)
        self.keeps_values = per_sample
        if per_sample:
            self.add_state("values", default=[], dist_reduce_fx="cat")

    def _add(self, values: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        values = values.detach().float().reshape(-1)
        if keep is not None:
            values = torch.where(keep.reshape(-1).bool().to(values.device), values, float("nan"))
        super().update(values[~values.isnan()])
        if self.keeps_values:
            self.values.append(values)  # aligned with the samples: NaN where not counted

    def update(self, values: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        self._add(values, keep)

    def per_sample(self) -> torch.Tensor:
        """Every counted sample's value; under DDP those of all processes (in process order)."""
        values = self.by_sample()
        return values[~values.isnan()]

    def by_sample(self) -> torch.Tensor:
        """One value per updated sample, in update order, NaN where the sample was not counted (for intervals and
        paired comparisons of two models on the same samples)."""
        values = _gathered_values(self)
        return values if values is not None else torch.empty(0, device=self.device)


class _MapMetric(Metric):
    """A metric comparing clean with perturbed maps, over the samples whose label was kept (NaN scores dropped).

    Its state holds the sums and counts of the scores of ``group``: the registered map metrics scored together
    (by default only itself). Members of one `map_collection` share one ``group`` and so one state: torchmetrics
    updates the first and hands its state to the others (a compute group)."""

    full_state_update = False
    name: ClassVar[str]
    higher_is_better: bool | None = None
    worst: ClassVar[float | None]

    def __init_subclass__(
        cls,
        name: str,
        higher_is_better: bool,
        worst: float | None,
        score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        **kwargs,
    ) -> None:
        """A map metric is its registered name, its direction, its worst possible value (None: unbounded; an
        attack stops on a sample that reached it) and its per-sample score (a function of the clean and perturbed
        maps; or a static ``fn(maps_clean, maps_adv, k)`` when it needs k)."""
        super().__init_subclass__(**kwargs)
        cls.name, cls.higher_is_better, cls.worst = name, higher_is_better, worst
        if score is not None:
            cls.fn = staticmethod(lambda maps_clean, maps_adv, k: score(maps_clean, maps_adv))

    def __init__(
        self, k: int | None = None, per_sample: bool = False, group: Sequence[str] | None = None, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.k = k
        self.group = tuple(group) if group is not None else (self.name,)
        if self.name not in self.group or not set(self.group) <= set(MAP_METRICS):
            raise ValueError(f"{type(self).__name__}: group {self.group} must hold {self.name!r} and only names of "
                             f"MAP_METRICS ({', '.join(MAP_METRICS)})")  # fmt: skip
        self.keeps_values = per_sample
        self.add_state("sums", default=torch.zeros(len(self.group)), dist_reduce_fx="sum")
        self.add_state("counts", default=torch.zeros(len(self.group)), dist_reduce_fx="sum")
        if per_sample:
            self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, maps_clean: torch.Tensor, maps_adv: torch.Tensor, kept: torch.Tensor | None = None) -> None:
        if kept is not None:
            keep = kept.reshape(-1).bool().to(maps_clean.device)
            maps_clean, maps_adv = maps_clean[keep], maps_adv[keep]
        rows = torch.stack([MAP_METRICS[name].fn(maps_clean, maps_adv, self.k) for name in self.group], dim=1)
        rows = rows.detach().float().to(self.sums.device)
        counted = ~rows.isnan()
        self.sums += rows.nan_to_num(0.0).sum(dim=0)
        self.counts += counted.sum(dim=0)
        if self.keeps_values:
            if kept is not None:  # aligned with the samples: NaN rows where the label was not kept
                rows = torch.full((len(keep), len(self.group)), float("nan"), device=rows.device).index_put_(
                    (keep.to(rows.device).nonzero().flatten(),), rows
                )
            self.values.append(rows)

    def compute(self) -> torch.Tensor:
        i = self.group.index(self.name)
        return self.sums[i] / self.counts[i]  # NaN (0 / 0) when no sample counted

    def per_sample(self) -> torch.Tensor:
        """Every counted sample's value; under DDP those of all processes (in process order)."""
        column = self.by_sample()
        return column[~column.isnan()]

    def by_sample(self) -> torch.Tensor:
        """One value per updated sample, in update order, NaN where the sample was not kept or has no value (a
        constant map's Spearman)."""
        rows = _gathered_values(self)
        if rows is None:
            return torch.empty(0, device=self.device)
        return rows[:, self.group.index(self.name)]


class TopKIntersection(_MapMetric, name="topk_intersection", higher_is_better=True, worst=0.0):
    """Share of the clean map's top-k pixels still in the perturbed map's top-k (higher: more robust).
    ``k=None`` takes the size rule of `default_k` from the maps' height and width."""

    @staticmethod
    def fn(maps_clean: torch.Tensor, maps_adv: torch.Tensor, k: int | None) -> torch.Tensor:
        return F.topk_intersection(maps_clean, maps_adv, k or F.default_k(*maps_clean.shape[1:]))


class SpearmanCorrelation(_MapMetric, name="spearman", higher_is_better=True, worst=-1.0, score=F.spearman):
    """Spearman's rank correlation of the clean and perturbed maps' pixels (ties averaged)."""


class KendallTau(_MapMetric, name="kendall", higher_is_better=True, worst=-1.0, score=F.kendall_tau):
    """Kendall's tau-b of the clean and perturbed maps' pixels."""


class CenterShift(_MapMetric, name="center_shift", higher_is_better=False, worst=None, score=F.center_shift):
    """Distance in pixels between the centres of mass of the clean and perturbed maps."""


class CosineDistance(_MapMetric, name="cosine_distance", higher_is_better=False, worst=1.0, score=F.cosine_distance):
    """One minus the cosine similarity of the clean and perturbed maps."""


class _TopKFamily(_MapMetric, name="_topk_family", higher_is_better=True, worst=0.0):
    """Base of the registered locality-aware top-k metrics (3x3 neighbourhood, `default_k` when k is None)."""

    score_k: ClassVar[Callable[..., torch.Tensor]]

    def __init_subclass__(cls, score_k: Callable[..., torch.Tensor] | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if score_k is not None:
            cls.fn = staticmethod(lambda a, b, k: score_k(a, b, k or F.default_k(*a.shape[1:]), 3))


class LensRecall(_TopKFamily, name="lens_recall", higher_is_better=True, worst=0.0, score_k=F.lens_recall):
    """3-LENS-recall@k (Kamath et al. 2024): the perturbed map's top-k pixels within a 3x3 neighbourhood of the
    clean map's top k."""


class LensPrecision(_TopKFamily, name="lens_precision", higher_is_better=True, worst=0.0, score_k=F.lens_precision):
    """3-LENS-precision@k: the clean map's top-k pixels within a 3x3 neighbourhood of the perturbed map's top k."""


class TopKDivIntersection(_TopKFamily, name="topk_div", higher_is_better=True, worst=0.0,
                          score_k=F.topk_div_intersection):  # fmt: skip
    """Top-k-div intersection: the diversity-aware top k (no two pixels in one 3x3 neighbourhood) kept."""


class LensRecallDiv(_TopKFamily, name="lens_recall_div", higher_is_better=True, worst=0.0,
                    score_k=F.lens_recall_div):  # fmt: skip
    """3-LENS-recall@k-div, the paper's headline metric: locality and diversity together."""


# The one registry of the metrics comparing a clean map with a perturbed one: the names every callback logs
# (``val/frag/<method>/<attack>_<eps>/<name>``) and every audit table and report.json key uses.
MAP_METRICS: dict[str, type[_MapMetric]] = {
    cls.name: cls
    for cls in (
        TopKIntersection,
        SpearmanCorrelation,
        KendallTau,
        CenterShift,
        CosineDistance,
        LensRecall,
        LensPrecision,
        TopKDivIntersection,
        LensRecallDiv,
    )
}


def map_collection(k: int | None = None, prefix: str | None = None, per_sample: bool = False) -> MetricCollection:
    """Every registered map metric by its name, as one collection scored once per batch (one compute group);
    ``k`` for the top-k intersection. ``collection.update(maps_clean, maps_adv, kept)``; ``compute()`` gives
    ``{prefix + name: mean}``."""
    group = tuple(MAP_METRICS)
    metrics = {name: cls(k=k, per_sample=per_sample, group=group) for name, cls in MAP_METRICS.items()}
    return MetricCollection(metrics, prefix=prefix, compute_groups=[list(group)])


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


def fragility_collection(k: int | None = None, prefix: str | None = None, per_sample: bool = False) -> MetricCollection:
    """What one explanation attack setting reports, in a callback and in the audit alike: every map metric (one
    compute group, see `map_collection`) and the label-kept rate. ``update(maps_clean=, maps_adv=, kept=)``;
    ``per_sample=True`` keeps every sample's values (``by_sample()`` of each member), for intervals."""
    collection = map_collection(k, prefix, per_sample)
    collection.add_metrics({"label_kept": LabelKeptRate(per_sample=per_sample)})
    return collection
