"""Data for one specialist: its group, batches that over-represent it, and its dustbin labels.

:class:`GroupOversampler` draws a fixed share of every training epoch from the group's classes (half,
in Hinton et al. 2015) and the rest from all other classes; :class:`SpecialistDataModule` uses it for
training and adds ``batch["specialist_target"]`` to every batch the Trainer runs: the position of the
target in the group, or ``len(group)`` (the dustbin) for any other class. ``target`` and ``index`` keep
their meaning (full label space, stable sample position), so soft targets keyed by ``index`` still fit.

The DataModule owns the group's classes (from a groups file and group, or given): it is the one place
that relabels, and ``kd`` links ``group_classes``, ``group`` and ``groups_file`` into the
:class:`~kd_lightning.specialists.SpecialistModule`, as it links ``num_classes``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler
from torchvision.transforms import v2

from kd_lightning.datamodules.base import ClassificationSource, IndexedDataModule
from kd_lightning.datamodules.transforms import Transform
from kd_lightning.specialists.sampling import GroupSampling, relabel_map, resolve_group


class GroupOversampler(Sampler[int]):
    """Indices of an epoch in which a fixed share comes from a group of classes.

    Each epoch has ``num_samples`` positions: ``round(group_fraction * num_samples)`` of them go to the
    group's samples and the others to the remaining samples, each side cycling through fresh random
    permutations of its own samples (so a small group is repeated, never favoured within itself), then
    all positions are shuffled together. The share is exact per epoch and holds per batch in
    expectation. The order depends only on ``seed`` and the epoch (:meth:`set_epoch`, which Lightning
    calls, also through its DDP wrapper), so every process draws the same epoch and the DDP wrapper
    shards it.

    Args:
        targets: ``(N,)`` class of each sample of the dataset the sampler indexes.
        classes: the group's class ids.
        group_fraction: share of each epoch drawn from the group, in ``(0, 1)``.
        num_samples: epoch length (default: the dataset's length).
        seed: base seed of the draws.

    Raises:
        ValueError: a share outside ``(0, 1)``, or no sample inside or outside the group.

    Example:
        >>> s = GroupOversampler(torch.tensor([0, 1, 1, 1, 1, 1, 1, 1]), classes=[0], group_fraction=0.5)
        >>> sum(1 for i in s if i == 0), len(s)
        (4, 8)
    """

    def __init__(
        self,
        targets: Tensor,
        classes: Sequence[int],
        group_fraction: float = 0.5,
        num_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        if not 0.0 < group_fraction < 1.0:
            raise ValueError(
                f"`oversample` (the group's share of each batch) must lie in (0, 1), got {group_fraction!r}."
            )
        targets = torch.as_tensor(targets).long()
        in_group = torch.isin(targets, torch.as_tensor(list(classes), dtype=torch.long))
        self.group_indices = in_group.nonzero().squeeze(1)
        self.rest_indices = (~in_group).nonzero().squeeze(1)
        if len(self.group_indices) == 0 or len(self.rest_indices) == 0:
            side = "of" if len(self.group_indices) == 0 else "outside"
            raise ValueError(
                f"the training data has no sample {side} the group {list(classes)}: nothing to oversample."
            )
        self.num_samples = len(targets) if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"`epoch_size` must be a positive integer, got {num_samples!r}.")
        self.num_group = min(max(round(group_fraction * self.num_samples), 1), self.num_samples - 1)
        self.seed = seed
        self.epoch = 0

    @property
    def data_fraction(self) -> float:
        """The group's share of the dataset."""
        return len(self.group_indices) / (len(self.group_indices) + len(self.rest_indices))

    @property
    def batch_fraction(self) -> float:
        """The group's share of an epoch, exactly (after rounding to whole samples)."""
        return self.num_group / self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        group = _cycle(self.group_indices, self.num_group, g)
        rest = _cycle(self.rest_indices, self.num_samples - self.num_group, g)
        both = torch.cat([group, rest])
        return iter(both[torch.randperm(len(both), generator=g)].tolist())


def _cycle(indices: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` draws from ``indices``: whole random permutations, then part of one more."""
    rounds = math.ceil(n / len(indices))
    perms = [indices[torch.randperm(len(indices), generator=generator)] for _ in range(rounds)]
    return torch.cat(perms)[:n]


class SpecialistDataModule(IndexedDataModule):
    """:class:`~kd_lightning.datamodules.base.IndexedDataModule` for training one specialist.

    Training batches come from :class:`GroupOversampler`; validation and test stay natural (the
    specialist's dustbin correction is meant for them). Every batch the Trainer runs gets
    ``batch["specialist_target"]`` (added in ``on_before_batch_transfer``).

    The group is group ``group`` of ``groups_file``, or ``classes`` given directly (one of the two),
    resolved and checked on construction (:attr:`group_classes`); ``kd`` links it into the model, so a
    config names the groups file and group once, on the data. :attr:`group_sampling` tells the model the
    group's share of the data and of the batches, from which it computes the dustbin correction. Both
    make up :class:`~kd_lightning.specialists.sampling.SpecialistData`, what the model reads.

    Args:
        source: the dataset.
        batch_size: training batch size per process.
        eval_batch_size: validation/test batch size per process.
        val_size: validation samples carved from the training file (a count or a fraction).
        split_seed: seed of the train/validation split.
        num_workers: DataLoader workers; ``None``: the policy of :class:`IndexedDataModule`.
        pin_memory: pin host memory; ``None``: exactly on a GPU.
        train_transform: training augmentation (this package's or a torchvision ``v2`` pipeline).
        train_fraction: keep only this fraction of the training split.
        oversample: the group's share of each training epoch (paper: 0.5); ``None`` samples naturally.
        groups_file: a groups file (docs/architecture.md) for the source's classes.
        group: which group of ``groups_file``.
        classes: the group's classes given directly, instead of ``groups_file``.
        epoch_size: training samples per epoch (default: the training split's size).
        sampler_seed: seed of the oversampler; ``None`` follows ``seed_everything`` (``torch.initial_seed()``).
        eval_transform: the un-augmented input of a source's item (see :class:`IndexedDataModule`).

    Raises:
        ValueError: both or neither of ``groups_file`` and ``classes``; the groups file is for another
            number of classes or is malformed; ``group`` is out of range; the group leaves no class for
            the dustbin or has ids outside the label space; a bad ``oversample`` or ``epoch_size``.
        FileNotFoundError: ``groups_file`` does not exist.
    """

    def __init__(
        self,
        source: ClassificationSource,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int | float = 0.1,
        split_seed: int = 0,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        train_transform: Transform | v2.Transform | None = None,
        train_fraction: float = 1.0,
        oversample: float | None = 0.5,
        groups_file: str | None = None,
        group: int = 0,
        classes: list[int] | None = None,
        epoch_size: int | None = None,
        sampler_seed: int | None = None,
        eval_transform: v2.Transform | None = None,
    ) -> None:
        super().__init__(
            source,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            val_size=val_size,
            split_seed=split_seed,
            num_workers=num_workers,
            pin_memory=pin_memory,
            train_transform=train_transform,
            train_fraction=train_fraction,
            eval_transform=eval_transform,
        )
        if oversample is not None and not 0.0 < oversample < 1.0:
            raise ValueError(f"`oversample` must lie in (0, 1) or be null, got {oversample!r}.")
        if epoch_size is not None and not (isinstance(epoch_size, int) and epoch_size > 0):
            raise ValueError(f"`epoch_size` must be a positive integer or null, got {epoch_size!r}.")
        self.oversample = oversample
        self.groups_file = groups_file
        self.group = group
        #: The group's classes, in the order of the specialist's labels.
        self.group_classes: list[int] = resolve_group(self.num_classes, groups_file, group, classes)
        self.epoch_size = epoch_size
        self.sampler_seed = sampler_seed
        self._sampler: GroupOversampler | None = None
        self._label_map = relabel_map(self.group_classes, self.num_classes)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.train_set is not None and self.oversample is not None:
            seed = self.sampler_seed if self.sampler_seed is not None else torch.initial_seed() % 2**31
            self._sampler = GroupOversampler(
                self.train_set.targets, self.group_classes, self.oversample, self.epoch_size, seed
            )

    @property
    def group_sampling(self) -> GroupSampling | None:
        """The group's share of the training data and of the training batches (``None`` before setup
        of the training split, or when sampling naturally)."""
        if self._sampler is None:
            return None
        return GroupSampling(
            tuple(self.group_classes), self._sampler.data_fraction, self._sampler.batch_fraction
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("call `setup()` before asking for a dataloader.")
        if self._sampler is None:  # natural sampling
            return super().train_dataloader()
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=self._sampler,
            **self.loader_kwargs("train"),
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "target" in batch:
            batch["specialist_target"] = self._label_map[batch["target"]]
        return batch
