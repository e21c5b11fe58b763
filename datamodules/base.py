"""Indexed classification data: the batch contract of docs/architecture.md.

Every item is ``{"input": Tensor, "target": int, "index": int}``. ``index`` is the sample's position
in its *source* split (the training file or the test file), so it does not change with the
validation carve-out, shuffling, workers, DDP sharding or resumption: soft targets are keyed by it.

A dataset is a :class:`ClassificationSource` (where the files are, how to read them) chosen by
``class_path``; :class:`IndexedDataModule` does the rest (split, loaders) once for all of them.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kd_lightning.cache.protocols import CacheDataModule, EpochSetting, LoaderOptions, ReplayableDataset
from kd_lightning.contracts import NamedClasses
from kd_lightning.datamodules.resumable import ResumableLoader
from kd_lightning.datamodules.transforms import Transform, replay_seed

VIEW_SCHEDULES = ("cycle", "random")
# Salt that keeps the "random" view schedule's draws independent of the augmentations' own seeds.
_SCHEDULE_SALT = 0x5EED_71E3


class ClassificationSource(ABC):
    """Where a classification dataset lives and how to read it.

    Subclasses set ``name``, ``num_classes``, ``input_shape`` and ``class_names`` (attributes or
    properties) and implement :meth:`load`. :meth:`prepare` downloads or checks files; Lightning calls
    it on one process only.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: list[str]

    def prepare(self) -> None:  # noqa: B027 - optional hook, most sources have nothing to fetch
        """Fetch or check files; runs once per node before :meth:`load`."""

    @abstractmethod
    def load(self, train: bool) -> tuple[Dataset, Tensor]:
        """Return the training (``train=True``) or test split as a dataset of ``(input, target)`` pairs
        and the 1-D int64 tensor of all its targets."""


class IndexedDataset(Dataset, ReplayableDataset):
    """A view of ``source`` restricted to ``indices`` whose items follow the batch contract.

    It is a :class:`~kd_lightning.cache.protocols.ReplayableDataset`: the soft-target cache reads its
    rows through ``indices`` and :meth:`input_of`.

    With ``augment_seed`` set, augmentation is *replayable*: the input of sample ``j`` at an epoch is
    view ``v`` of it, the transform run with a generator seeded by
    :func:`~kd_lightning.datamodules.transforms.replay_seed` ``(augment_seed, j, v)``, so :meth:`input_of` ``(j, v)``
    gives the same tensor in any process at any time; items then also carry ``"view": v``. Which view
    an epoch serves is set by ``views`` and ``view_schedule`` (see :meth:`view_of`) from the epoch
    last given to :meth:`set_epoch`.

    Args:
        source: dataset of ``(input, target)`` pairs.
        targets: all targets of ``source``.
        indices: positions in ``source`` this view exposes, in order.
        transform: applied to each input (training augmentation); ``None`` for evaluation.
        augment_seed: seed of replayable augmentation; ``None`` draws from torch's global RNG (not
            replayable, and items have no ``"view"``).
        views: number of distinct views per sample; ``None`` gives a new view every epoch.
        view_schedule: ``"cycle"`` (view ``epoch % views``) or ``"random"`` (a seeded draw from
            ``(augment_seed, index, epoch)`` in ``[0, views)``).
    """

    def __init__(
        self,
        source: Dataset,
        targets: Tensor,
        indices: Tensor,
        transform: Transform | None = None,
        augment_seed: int | None = None,
        views: int | None = None,
        view_schedule: str = "cycle",
    ) -> None:
        check_replay(augment_seed, views, view_schedule)
        self.source = source
        self.indices = indices.long()
        self.targets = targets[self.indices]
        self.transform = transform
        self.augment_seed = augment_seed
        self.views = views
        self.view_schedule = view_schedule
        # In shared memory: persistent DataLoader workers keep their own copy of this dataset, and
        # must still see the epoch that the main process sets.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_() if augment_seed is not None else None

    @property
    def replayable(self) -> bool:
        """Whether each item's augmentation is a function of ``(augment_seed, index, view)``."""
        return self.augment_seed is not None

    def set_epoch(self, epoch: int) -> None:
        """Serve the views of ``epoch`` from now on (a no-op unless augmentation is replayable)."""
        if self._epoch is not None:
            self._epoch.fill_(int(epoch))

    def view_of(self, index: int, epoch: int | None = None) -> int:
        """The view of sample ``index`` served at ``epoch`` (default: the epoch last set)."""
        if self.augment_seed is None:
            raise RuntimeError("views exist only with replayable augmentation: set `augment_seed`.")
        epoch = int(self._epoch) if epoch is None else epoch
        if self.view_schedule == "random":
            return replay_seed(self.augment_seed ^ _SCHEDULE_SALT, index, epoch) % self.views
        return epoch if self.views is None else epoch % self.views

    def input_of(self, index: int, view: int | None = None) -> Tensor:
        """Input of sample ``index`` (a position in ``source``): augmentation view ``view``, or the
        un-augmented input for ``None``."""
        x, _ = self.source[index]
        return x if view is None else self._augment(x, index, view)

    def _augment(self, x: Tensor, index: int, view: int) -> Tensor:
        if self.transform is None:
            return x
        generator = torch.Generator().manual_seed(replay_seed(self.augment_seed, index, view))
        return self.transform(x, generator=generator)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = int(self.indices[i])
        x, y = self.source[j]
        if self.augment_seed is not None:
            view = self.view_of(j)
            return {"input": self._augment(x, j, view), "target": int(y), "index": j, "view": view}
        if self.transform is not None:
            x = self.transform(x)
        return {"input": x, "target": int(y), "index": j}


def check_replay(augment_seed: int | None, views: int | None, view_schedule: str) -> None:
    """Raise a ValueError naming the argument unless the replayable-augmentation settings fit together."""
    if view_schedule not in VIEW_SCHEDULES:
        raise ValueError(f"`view_schedule` must be one of {VIEW_SCHEDULES}, got {view_schedule!r}.")
    if views is not None and not (isinstance(views, int) and views >= 1):
        raise ValueError(f"`augment_views` must be a positive integer or None, got {views!r}.")
    if augment_seed is None and (views is not None or view_schedule != "cycle"):
        raise ValueError(
            "`augment_views` and `view_schedule` choose among replayable augmentation views: "
            f"set `augment_seed` too (got augment_views={views!r}, view_schedule={view_schedule!r})."
        )
    if view_schedule == "random" and views is None:
        raise ValueError("`view_schedule='random'` draws among `augment_views` views: set `augment_views`.")


def split_indices(n: int, val_size: int | float, seed: int) -> tuple[Tensor, Tensor]:
    """Deterministic train/validation split of ``range(n)``; each part sorted.

    Args:
        n: number of samples in the training file.
        val_size: a count (int) or a fraction in ``[0, 1)`` (float).
        seed: the split's own seed, independent of the training seed.

    Raises:
        ValueError: if ``val_size`` leaves no training sample.

    Example:
        >>> tr, va = split_indices(10, 0.2, seed=0)
        >>> len(tr), len(va), sorted(tr.tolist() + va.tolist()) == list(range(10))
        (8, 2, True)
    """
    n_val = round(val_size * n) if isinstance(val_size, float) else int(val_size)
    if not 0 <= n_val < n:
        raise ValueError(f"`val_size` must leave training data: got {val_size!r} for {n} training samples.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def targets_hash(targets: Tensor) -> str:
    """Short content hash of a target vector (part of a dataset's fingerprint)."""
    return hashlib.sha256(targets.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


class IndexedDataModule(L.LightningDataModule, CacheDataModule, NamedClasses, EpochSetting, LoaderOptions):
    """Train/validation/test loaders over one :class:`ClassificationSource`.

    It is what the soft-target cache needs from data (:mod:`kd_lightning.cache.protocols`): a
    ``CacheDataModule`` (``<split>_set``, :meth:`fingerprint`, ``num_classes``), with
    :meth:`set_epoch` and loader settings; and it names its classes
    (:class:`~kd_lightning.contracts.NamedClasses`, read by the dashboard and the clustering).

    The validation split is carved from the training file with its own seed (``split_seed``), so it
    is the same for every run, model and process.

    Args:
        source: the dataset (``class_path`` in YAML), e.g. ``kd_lightning.datamodules.FashionMNIST``.
        batch_size: training batch size per process.
        eval_batch_size: validation/test/predict batch size per process.
        val_size: validation samples carved from the training file: a count or a fraction.
        split_seed: seed of the train/validation split.
        num_workers: DataLoader workers (0 loads in the main process, best for in-memory data).
        pin_memory: pin host memory (GPU training).
        train_transform: augmentation applied to training inputs only.
        train_fraction: keep only this fraction of the training split (seeded by ``split_seed``),
            for data-efficiency experiments.
        augment_seed: make training augmentation replayable: each sample's augmentation is a
            function of ``(augment_seed, index, view)`` and training items carry ``"view"`` (see
            :class:`IndexedDataset`). Needed by the soft-target cache's augmentation-consistent mode.
            Whoever trains must call :meth:`set_epoch` every epoch; the SoftTargetCache callback does.
        augment_views: distinct views per sample (``None``: a new view every epoch).
        view_schedule: ``"cycle"`` (view ``epoch % augment_views``) or ``"random"`` (seeded).
        omit_classes: classes left out of the training split (after ``train_fraction``), e.g. a transfer
            set that never shows the student a class; validation and test keep every class.
    """

    def __init__(
        self,
        source: ClassificationSource,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int | float = 5000,
        split_seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        train_transform: Transform | None = None,
        train_fraction: float = 1.0,
        augment_seed: int | None = None,
        augment_views: int | None = None,
        view_schedule: Literal["cycle", "random"] = "cycle",
        omit_classes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        check_replay(augment_seed, augment_views, view_schedule)
        if not isinstance(source, ClassificationSource):
            raise TypeError(f"`source` must be a ClassificationSource, got {type(source).__name__}.")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"`train_fraction` must lie in (0, 1], got {train_fraction!r}.")
        omit_classes = tuple(omit_classes)
        known = all(isinstance(c, int) and 0 <= c < source.num_classes for c in omit_classes)
        if not known or len(set(omit_classes)) >= source.num_classes:
            raise ValueError(
                f"`omit_classes` must be class ids in [0, {source.num_classes}) that leave at least one class "
                f"to train on, got {list(omit_classes)!r}."
            )
        self.source = source
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_size = val_size
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_transform = train_transform
        self.train_fraction = train_fraction
        self.augment_seed = augment_seed
        self.augment_views = augment_views
        self.view_schedule = view_schedule
        self.omit_classes = omit_classes
        self.train_set: IndexedDataset | None = None
        self.val_set: IndexedDataset | None = None
        self.test_set: IndexedDataset | None = None

    # What models are built from; linked into the model by the CLI.
    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.source.input_shape)

    @property
    def class_names(self) -> list[str]:
        return list(self.source.class_names)

    def prepare_data(self) -> None:
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit", "validate"):
            data, targets = self.source.load(train=True)
            train_idx, val_idx = split_indices(len(targets), self.val_size, self.split_seed)
            if self.train_fraction < 1.0:
                keep = torch.randperm(
                    len(train_idx), generator=torch.Generator().manual_seed(self.split_seed + 1)
                )
                train_idx = train_idx[
                    keep[: max(1, round(self.train_fraction * len(train_idx)))].sort().values
                ]
            if self.omit_classes:
                train_idx = train_idx[~torch.isin(targets[train_idx], torch.tensor(self.omit_classes))]
            self.train_set = IndexedDataset(
                data,
                targets,
                train_idx,
                self.train_transform,
                augment_seed=self.augment_seed,
                views=self.augment_views,
                view_schedule=self.view_schedule,
            )
            self.val_set = IndexedDataset(data, targets, val_idx)
        if self.test_set is None and stage in (None, "test", "predict"):
            data, targets = self.source.load(train=False)
            self.test_set = IndexedDataset(data, targets, torch.arange(len(targets)))

    def _loader(self, dataset: IndexedDataset | None, shuffle: bool, batch_size: int) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call `setup()` before asking for a dataloader.")
        # Shuffled: RandomSampler's order, resumable mid-epoch from a checkpoint (datamodules/resumable.py).
        kind = ResumableLoader if shuffle else DataLoader
        return kind(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def set_epoch(self, epoch: int) -> None:
        """Serve the training views of ``epoch`` (replayable augmentation only; otherwise a no-op)."""
        if self.train_set is not None:
            self.train_set.set_epoch(epoch)

    def fingerprint(self, split: str) -> dict[str, Any]:
        """Identity of one split (``"train"``, ``"val"`` or ``"test"``): name, length and a target hash."""
        dataset = {"train": self.train_set, "val": self.val_set, "test": self.test_set}.get(split)
        if dataset is None:
            raise ValueError(f"`split` must be one of 'train', 'val', 'test' after setup(), got {split!r}.")
        return {
            "dataset": self.source.name,
            "split": split,
            "length": len(dataset),
            "targets": targets_hash(dataset.targets),
        }
