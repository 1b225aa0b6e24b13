"""What every audit section shares: the audited subset, the section protocol, and what a section renders.

A section runs the library's own attacks, attributions and metrics (no second implementation) on the audit's
fixed, seeded subset and returns plain JSON-able results (``run`` per checkpoint, ``run_all`` across checkpoints
for ``cross_model`` sections). It renders its own results (``render``): HTML text stating only what was measured,
tables holding every number its figures show, and its figures. The cache identifies a section by its complete
state (`robustattr.audit.cache.fingerprint`), so every setting a section holds takes part in its cache key.
"""

from __future__ import annotations

import copy
import html
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from robustattr.audit.distributed import SINGLE, Shard
from robustattr.rng import mix

Progress = Callable[[int], None]


class TrainingData:
    """The training split a checkpoint was trained on, as evaluation sees it (no augmentation, with its planted
    label noise): built on first use from ``config`` (the checkpoint's own stored data settings, or the audit's
    ``data``) by ``build`` (the engine's trusted, never-downloading DataModule factory)."""

    def __init__(self, config: dict[str, Any], build: Callable[[dict[str, Any]], Any]) -> None:
        self.config = config
        self._build = build
        self._datamodule = None
        self._training_set = None

    def datamodule(self):
        if self._datamodule is None:
            self._datamodule = self._build(self.config)
        return self._datamodule

    def training_set(self):
        from robustattr.influence import TrainingSet

        if self._training_set is None:
            self._training_set = TrainingSet.from_datamodule(self.datamodule())
        return self._training_set

    def flipped_labels(self) -> dict[int, tuple[int, int]]:
        """Training index -> (original, planted) label of each planted flip (empty without planted noise)."""
        flips = getattr(self.datamodule(), "flipped_labels", None)
        return flips() if flips is not None else {}


@dataclass
class AuditData:
    """The audited subset and how this process goes through it.

    Every sample has an index (its place in the subset) and its random numbers come from seeds that are a
    function of (``seed``, index) only (`seeds`), so a sample's numbers do not depend on the chunk it is batched
    in, on the batch size, or on the process of a torchrun/SLURM job that computes it. Under such a job each
    process goes through its contiguous share of the samples (`batches`, `shard`) and sections gather what they
    aggregate (`gather`, `cat`; torchmetrics states sync by themselves) in sample order."""

    x: torch.Tensor  # (N, C, H, W) in [0, 1], CPU
    y: torch.Tensor
    batch_size: int
    seed: int
    training: TrainingData | None = None  # for sections with uses_training: the audited checkpoint's training split
    shard: Shard = SINGLE  # this process's place in the job
    stack_copies: bool = False  # True on GPUs: a chunk keeps batch_size samples when stacked for a sweep

    def _size(self, copies: int) -> int:
        return self.batch_size if self.stack_copies else max(1, self.batch_size // copies)

    def batches(
        self, limit: int | None = None, copies: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(indices, x, y) chunks of this process's share of the first ``limit`` samples. ``copies``: the chunk
        will be stacked that many times (an epsilon sweep); on a CPU it then holds ``batch_size // copies``
        samples, so the stacked batch stays within ``batch_size`` (a larger batch of a second-order attack costs
        more per sample there); on a GPU (``stack_copies``) it holds ``batch_size``: larger batches fill it."""
        n = len(self.x) if limit is None else min(limit, len(self.x))
        block, size = self.shard.block(n), self._size(copies)
        for start in range(block.start, block.stop, size):
            stop = min(start + size, block.stop)
            yield torch.arange(start, stop), self.x[start:stop], self.y[start:stop]

    def count(self, limit: int | None = None, copies: int = 1) -> int:
        """Chunks of the whole job (every process's share)."""
        n = len(self.x) if limit is None else min(limit, len(self.x))
        size = self._size(copies)
        return sum(math.ceil(len(self.shard.block(n, r)) / size) for r in range(self.shard.world))

    def local_count(self, limit: int | None = None, copies: int = 1) -> int:
        """Chunks of this process's share."""
        n = len(self.x) if limit is None else min(limit, len(self.x))
        return math.ceil(len(self.shard.block(n)) / self._size(copies))

    def seeds(self, index: torch.Tensor, copies: int = 1, salt: int = 0) -> tuple[int, ...]:
        """One seed per row of ``index`` stacked ``copies`` times (copy-major, as `stacked` builds the batch):
        row (copy e, sample i) gets mix(seed, salt, i, e). ``salt`` names an independent stream."""
        return tuple(mix(self.seed, salt, int(i), e) for e in range(copies) for i in index.tolist())

    def gather(self, items: list) -> list:
        """Every process's ``items`` in sample order (this process's alone outside a job)."""
        return self.shard.gather(items)

    def cat(self, tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
        """``torch.cat`` of every process's per-chunk tensors, in sample order."""
        return torch.cat(self.gather([t.detach().cpu() for t in tensors]), dim=dim)

    def local(self) -> AuditData:
        """The same data seen by one process alone (for work that only one process does: rendering, a section
        that cannot be split)."""
        return replace(self, shard=SINGLE)


@dataclass
class Thumbnail:
    """An image in a table cell (HTML: an inline PNG with its caption; W&B: a wandb.Image)."""

    image: np.ndarray  # (H, W) or (H, W, C) in [0, 1]
    caption: str = ""

    @classmethod
    def of(cls, t: torch.Tensor, caption: str = "") -> Thumbnail:
        from robustattr.viz import image_array

        return cls(image_array(t), caption)


@dataclass
class Table:
    header: list[str]
    rows: list[list]
    title: str = ""


@dataclass
class Rendered:
    """What a section shows in the report: paragraphs of HTML (escaped by the section), tables, figures."""

    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, Figure]] = field(default_factory=list)

    def say(self, sentence: str) -> None:
        self.text.append(html.escape(sentence))


@dataclass
class RenderContext:
    """What a section may use to draw beyond its results: the audited networks (eval mode), the subset, and each
    checkpoint's training split (`TrainingData`, for sections with ``uses_training``)."""

    models: dict[str, nn.Module]
    data: AuditData
    training: dict[str, TrainingData] = field(default_factory=dict)
    comparisons: dict[str, list[dict]] = field(default_factory=dict)  # section name -> paired comparisons


class Section:
    """Base class of the audit sections."""

    name = "section"
    title = "section"
    cross_model = False
    uses_training = False  # run() reads data.training: the audited checkpoint's own training split
    # How the processes of a torchrun/SLURM job share run(): "samples" (it goes through data.batches and gathers
    # what it aggregates: each process runs it on its share of the samples) or "engine" (every process runs it
    # on all samples and the engine it calls shares the work itself: the influence engine shards the training set).
    split: Literal["samples", "engine"] = "samples"

    def work(self, data: AuditData) -> int:
        """Units of progress (for the progress display)."""
        return data.count()

    def run(self, model: nn.Module, data: AuditData, progress: Progress) -> dict:
        raise NotImplementedError

    def run_all(self, models: dict[str, nn.Module], data: AuditData, progress: Progress) -> dict:
        raise NotImplementedError

    def render(self, results: dict, context: RenderContext) -> Rendered:
        """``results``: checkpoint name -> result, or the one result of a cross-model section."""
        raise NotImplementedError

    def paired_values(self, result: dict) -> dict[tuple, tuple[list[float], bool]]:
        """The per-sample values of one checkpoint's result that checkpoints audited together are compared on:
        (label fields as (name, value) pairs) -> (values on the audited samples in order, NaN where a sample does
        not count; whether higher is more robust). The engine compares every pair of checkpoints on them
        (`robustattr.audit.sections.uncertainty.compare`)."""
        return {}


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x.to(device_of(model))).float().cpu()


def eps_label(eps: float) -> str:
    return f"{eps * 255:.3g}/255"


def sweep(attack, epsilons: Sequence[float], n: int):
    """``attack`` for a batch of ``len(epsilons)`` stacked copies of ``n`` samples, each copy at its epsilon: the
    whole sweep in one pass (one batch of E x n) instead of one pass per epsilon."""
    eps = torch.tensor([float(e) for e in epsilons]).repeat_interleave(n)
    swept = copy.copy(attack)
    swept.threat = attack.threat.per_sample(eps)
    return swept


def stacked(t: torch.Tensor, copies: int) -> torch.Tensor:
    return t.repeat(copies, *[1] * (t.dim() - 1))


def method_panels(
    methods: Sequence[str],
    draw: Callable[[Any, str], None],
    ylabel: str,
    xlabel: str = "epsilon (x/255)",
    ylim: tuple[float, float] | None = (-0.02, 1.02),
    extra_width: float = 2.6,
) -> Figure:
    """One panel per method (three a row), ``draw(ax, method)`` filling each, one legend beside them all: the
    layout of the per-method figures of the explanation sections."""
    from robustattr.viz import grid, style

    with style():
        fig, axes = grid(len(methods), 3, 2.85, 2.7, extra_width=extra_width)
        for ax, method in zip(axes, methods, strict=True):
            draw(ax, method)
            ax.set_title(method)
            if ylim is not None:
                ax.set_ylim(*ylim)
            ax.set_xlabel(xlabel)
        axes[0].set_ylabel(ylabel)
        entries: dict[str, Any] = {}  # every panel's entries once (a noise floor is drawn on some panels only)
        for ax in axes[: len(methods)]:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                entries.setdefault(label, handle)
        fig.legend(list(entries.values()), list(entries), loc="outside right upper")
    return fig
