"""What the DataModules share: named splits, their loaders, the loader settings, and samples of plain images."""

from __future__ import annotations

import os
import warnings

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate

from robustattr.errors import ConfigError


def seeded_subset(dataset: Dataset, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` samples of ``dataset`` drawn by a seeded permutation, stacked as (images, labels). Built outside
    inference mode, so the tensors can take gradients wherever they are used."""
    with torch.inference_mode(False):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
        samples = [dataset[i] for i in order.tolist()]
        samples = [s for s in samples if s is not None]  # unreadable images skipped by the dataset
        x = torch.stack([torch.as_tensor(s[0]) for s in samples])
        y = torch.as_tensor([int(s[1]) for s in samples])
    return x, y


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def collate_readable(batch: list) -> object:
    """The default collate, without the samples a dataset returned as None (unreadable images it was told to skip)."""
    kept = [sample for sample in batch if sample is not None]
    if not kept:
        raise RuntimeError("every sample of a batch was unreadable")
    return default_collate(kept)


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """The labels of a dataset without loading its images where the dataset allows (tensors, targets, subsets)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].long()
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, NoisyLabels):
        labels = dataset_labels(dataset.dataset).clone()
        for index, label in dataset.labels.items():
            labels[index] = label
        return labels
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.long)
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])


class NoisyLabels(Dataset):
    """``dataset`` with the labels at some indices replaced (planted label noise)."""

    def __init__(self, dataset: Dataset, labels: dict[int, int]) -> None:
        self.dataset = dataset
        self.labels = labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        if sample is None or index not in self.labels:  # None: an unreadable image the dataset skips
            return sample
        label = sample[1]
        planted = (
            torch.as_tensor(self.labels[index], dtype=label.dtype) if torch.is_tensor(label) else self.labels[index]
        )
        return (sample[0], planted, *sample[2:])  # the label's own type: a batch collates ints or tensors, not both


class SplitDataModule(pl.LightningDataModule):
    """A DataModule whose ``setup`` fills ``self.splits`` ("train", "val", "test"); the loaders follow.

    Args:
        batch_size: training batch size (per process under DDP).
        eval_batch_size: batch size for validation and test (default: ``batch_size``).
        num_workers: DataLoader worker processes; None (the default) gives each process an equal share of the CPUs
            this process may use (at most 8), 0 loads in the main process.
        pin_memory: pin host memory for faster copies to a GPU (ignored without one).
        label_noise: the fraction of training labels flipped, each to a uniformly drawn other class (planted noise
            for label-checking experiments, Koh & Liang 2017); validation and test labels are never changed.
        noise_seed: the seed of the flips. The flipped indices are a function of (label_noise, noise_seed, the
            training split), so a checkpoint's stored data config reproduces them (`flipped_labels`); train.py
            writes them to the run directory as flipped_labels.json.

    Subclasses set ``drop_last_train`` (the last, smaller training batch is dropped for the large datasets) and
    may override `_plain_split` (a split without random augmentation, for samples and statistics)."""

    drop_last_train: bool = False

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        pin_memory: bool = True,
        label_noise: float = 0.0,
        noise_seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_noise < 1.0:
            raise ConfigError(f"{type(self).__name__}: label_noise is a fraction in [0, 1), got {label_noise}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ConfigError(
                f"{type(self).__name__}: batch sizes must be positive, got {batch_size} and {eval_batch_size}"
            )
        if num_workers is not None and num_workers < 0:
            raise ConfigError(f"{type(self).__name__}: num_workers must be non-negative, got {num_workers}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.label_noise = label_noise
        self.noise_seed = noise_seed
        self.splits: dict[str, Dataset] = {}
        self._flips: tuple[tuple[float, int], dict[int, tuple[int, int]]] | None = None

    def workers(self) -> int:
        """The worker count: as configured, or this process's share of the CPUs (at most 8)."""
        if self.num_workers is not None:
            return self.num_workers
        trainer = getattr(self, "trainer", None)  # set by Lightning when the module is attached
        processes = max(1, int(getattr(trainer, "num_devices", 1) or 1)) if trainer is not None else 1
        return max(0, min(8, available_cpus() // processes - 1))

    def flipped_labels(self) -> dict[int, tuple[int, int]]:
        """Training-split index -> (original label, planted label) of every flipped label (empty without noise)."""
        key = (self.label_noise, self.noise_seed)  # the settings the flips follow from: never a stale cache
        if self._flips is None or self._flips[0] != key:
            flips: dict[int, tuple[int, int]] = {}
            if self.label_noise > 0:
                self.setup()
                labels = dataset_labels(self.splits["train"])
                classes = int(self.num_classes)
                if classes < 2:
                    raise ConfigError(f"{type(self).__name__}: label_noise needs at least 2 classes")
                gen = torch.Generator().manual_seed(self.noise_seed)
                count = round(self.label_noise * len(labels))
                chosen = torch.randperm(len(labels), generator=gen)[:count].sort().values
                shifts = torch.randint(1, classes, (count,), generator=gen)
                for index, shift in zip(chosen.tolist(), shifts.tolist(), strict=True):
                    original = int(labels[index])
                    flips[index] = (original, (original + shift) % classes)
            self._flips = (key, flips)
        return self._flips[1]

    def _with_noise(self, split: str, dataset: Dataset) -> Dataset:
        if split != "train" or self.label_noise == 0:
            return dataset
        return NoisyLabels(dataset, {i: new for i, (_, new) in self.flipped_labels().items()})

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        workers = self.workers()
        return DataLoader(
            self._with_noise(split, self.splits[split]),
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),  # pinning needs an accelerator
            persistent_workers=workers > 0,
            drop_last=self.drop_last_train and split == "train",
            collate_fn=collate_readable,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def plain_split(self, split: str) -> Dataset:
        """``split`` without random augmentation (training images as evaluation sees them), with the planted label
        noise of the training split."""
        return self._with_noise(split, self._plain_split(split))

    def _plain_split(self, split: str) -> Dataset:
        self.setup()
        return self.splits[split]

    def sample_images(self, size: int = 32, split: str = "train", seed: int = 0) -> torch.Tensor:
        """A seeded sample of ``size`` plain images of ``split`` (N, C, H, W) in [0, 1]."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = self.plain_split(split)
        return seeded_subset(dataset, min(size, len(dataset)), seed)[0]
