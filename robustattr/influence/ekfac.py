"""EK-FAC (George et al. 2018; Grosse et al. 2023) through kronfluence: Kronecker-factored eigenbases of the
Gauss-Newton (true Fisher) matrix of the Linear and Conv2d layers in the scope, with eigenvalues refitted on the
data. kronfluence tracks only Linear and Conv2d layers, so BatchNorm and other layers are outside its scope
whatever the scope names (the scope is resolved to the Linear/Conv2d layers inside it).

Adapted to robustattr: the raw module (never a DDP wrapper) is prepared on a private copy, the task is the
cross-entropy of a classifier on (image in [0, 1], label) batches, and kronfluence's scores (positive = helpful,
``g_q^T (F + damping I)^{-1} g_i`` with F the average Fisher) are divided by n to share our scale. Under an
initialised process group on CUDA (LOCAL_RANK set, as torchrun and Lightning's DDP set it) kronfluence shards
factor fitting and scoring itself; on a CPU (gloo) group it does not, and every process computes the whole
result (equal to one process's: tests/test_influence.py).
Its files go to ``output_dir`` (default: a temporary directory removed with the object).
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from robustattr.errors import ConfigError
from robustattr.influence.base import Influence
from robustattr.influence.data import collate


@contextlib.contextmanager
def _gc_frozen():
    """kronfluence calls gc.collect() after every phase (9 times for a fit and self-influence); with torch, Lightning
    and W&B imported each full collection scans ~0.26 s of long-lived objects (2.4 s of a 5.5 s digits run).
    Freezing the objects that exist before the call (gc.freeze, made for this) leaves them out of those scans."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _task(modules: list[str], empirical: bool):
    from kronfluence.task import Task

    class ClassificationTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x).float()  # kronfluence works in fp32
            if sample and not empirical:
                with torch.no_grad():
                    y = torch.multinomial(logits.softmax(1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x).float(), y, reduction="sum")

        def get_influence_tracked_modules(self):
            return modules

    return ClassificationTask()


class EKFACInfluence(Influence):
    """Influence with kronfluence's EK-FAC. ``empirical_fisher``: use the training labels instead of labels
    sampled from the model (the true Fisher, equal to the Gauss-Newton matrix for cross-entropy). ``damping``:
    absolute, in the units of the average Fisher (as for the other backends)."""

    name = "ekfac"
    streams_gradients = False
    exclude_norm = True
    kinds = (nn.Linear, nn.Conv2d)

    def __init__(
        self,
        scope="last",
        damping: float = 0.01,
        empirical_fisher: bool = False,
        batch_size: int = 128,
        query_batch_size: int = 64,
        output_dir: str | None = None,
        dtype: torch.dtype | str = torch.float32,
    ) -> None:
        super().__init__(scope, damping, batch_size, dtype)
        if damping <= 0:
            raise ConfigError("EKFACInfluence: damping must be positive")
        self.empirical_fisher = empirical_fisher
        self.query_batch_size = query_batch_size
        self.output_dir = output_dir

    def settings(self):
        return {**super().settings(), "empirical_fisher": self.empirical_fisher}

    def _fit(self) -> None:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments
        from kronfluence.utils.dataset import DataLoaderKwargs

        if self.output_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="robustattr-ekfac-")
            self.output_dir = self._tmp.name
        self.analysis = f"robustattr-{uuid.uuid4().hex[:8]}"
        self.task = _task(list(self.scope.modules), self.empirical_fisher)
        prepared = prepare_model(self.model, self.task)
        self.analyzer = Analyzer(self.analysis, prepared, self.task, cpu=self.device.type == "cpu",
                                 disable_tqdm=True, output_dir=self.output_dir)  # fmt: skip
        self.analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate, num_workers=self.train.num_workers))
        args = FactorArguments(strategy="ekfac", use_empirical_fisher=self.empirical_fisher)
        torch.manual_seed(0)  # the sampled labels of the true Fisher
        with _gc_frozen():
            self.analyzer.fit_all_factors("factors", dataset=self.train.dataset, per_device_batch_size=self.batch_size,
                                          factor_args=args, overwrite_output_dir=True)  # fmt: skip

    def _score_args(self):
        from kronfluence.arguments import ScoreArguments

        return ScoreArguments(damping_factor=self.damping)

    def _no_explicit_inverse(self):
        raise ConfigError(
            "EKFACInfluence: kronfluence applies its inverse only inside its score computations, so query vectors and "
            "input gradients (I_pert,loss) need ExactInfluence or CGInfluence"
        )

    def query_vectors(self, x, y):
        self._no_explicit_inverse()

    def scores(self, x, y):
        self._require_fitted()
        self._check_fits(x, y)
        from torch.utils.data import TensorDataset

        name = f"pairwise-{uuid.uuid4().hex[:8]}"
        with _gc_frozen():
            self.analyzer.compute_pairwise_scores(
                name, "factors", query_dataset=TensorDataset(x.to(self.dtype), y.long()),
                train_dataset=self.train.dataset, per_device_query_batch_size=self.query_batch_size,
                per_device_train_batch_size=self.batch_size, score_args=self._score_args(), overwrite_output_dir=True,
            )  # fmt: skip
        values = self.analyzer.load_pairwise_scores(name)["all_modules"].to(torch.float64) * self.scale
        return self._result(values.float().cpu())

    def self_influence(self):
        self._require_fitted()
        name = f"self-{uuid.uuid4().hex[:8]}"
        with _gc_frozen():
            self.analyzer.compute_self_scores(name, "factors", train_dataset=self.train.dataset,
                                              per_device_train_batch_size=self.batch_size,
                                              score_args=self._score_args(), overwrite_output_dir=True)  # fmt: skip
        values = self.analyzer.load_self_scores(name)["all_modules"].to(torch.float64) * self.scale
        return self._result(values.float().cpu())

    def input_gradient(self, x_query, y_query, x_train, y_train):
        self._no_explicit_inverse()

    @property
    def files(self) -> Path:
        return Path(self.output_dir) / self.analysis
