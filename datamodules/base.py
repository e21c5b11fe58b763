"""Indexed classification data: the batch contract of docs/architecture.md.

Every item is ``{"input": Tensor, "target": int, "index": int}``. ``index`` is the sample's position
in its *source* split (the training file or the test file), so it does not change with the
validation carve-out, shuffling, workers, DDP sharding or resumption: soft targets are keyed by it.

A dataset is a :class:`ClassificationSource` (where the files are, how to read them) chosen by
``class_path``; :class:`IndexedDataModule` does the rest (split, loaders) once for all of them.
"""

from __future__ import annotations

import hashlib
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms import v2

from kd_lightning.cache.protocols import (
    SPLITS,
    CacheDataModule,
    EpochSetting,
    Feed,
    FeedSetting,
    LoaderOptions,
    ReplayableDataset,
)
from kd_lightning.contracts import NamedClasses
from kd_lightning.datamodules.loading import (
    LoaderSettings,
    cpus_given,
    loader_options,
    processes_sharing_cpus,
)
from kd_lightning.datamodules.resumable import ResumableLoader
from kd_lightning.datamodules.transforms import TorchvisionTransform, Transform, replay_seed

VIEW_SCHEDULES = ("cycle", "random")
# Salt that keeps the "random" view schedule's draws independent of the augmentations' own seeds.
_SCHEDULE_SALT = 0x5EED_71E3


class ClassificationSource(ABC):
    """Where a classification dataset lives and how to read it.

    Subclasses set ``name``, ``num_classes``, ``input_shape`` and ``class_names`` (attributes or
    properties) and implement :meth:`load`. :meth:`prepare` downloads or checks files; Lightning calls
    it on one process only.

    Sources whose files are not yet inputs (an image folder's pictures) set ``preprocess``: the
    deterministic step from a dataset item to the un-augmented input tensor. A source with its own
    validation split returns it from :meth:`load_val`; one without a test split sets ``has_test`` false
    (the DataModule then tests on the validation split).
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: list[str]
    preprocess: Callable[[Any], Tensor] | None = None
    has_test: bool = True

    def prepare(self) -> None:  # noqa: B027 - optional hook, most sources have nothing to fetch
        """Fetch or check files; runs once per node before :meth:`load`."""

    @abstractmethod
    def load(self, train: bool) -> tuple[Dataset, Tensor]:
        """Return the training (``train=True``) or test split as a dataset of ``(input, target)`` pairs
        and the 1-D int64 tensor of all its targets."""

    def load_val(self) -> tuple[Dataset, Tensor] | None:
        """The source's own validation split, like :meth:`load`; ``None`` (the default): the DataModule
        carves it out of the training split (``val_size``)."""
        return None


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
        transform: applied to each input (training augmentation); ``None`` for evaluation. A transform
            with ``raw_input`` (a torchvision pipeline, :class:`~kd_lightning.datamodules.TorchvisionTransform`)
            takes the source's item itself instead of its ``preprocess``-ed input.
        augment_seed: seed of replayable augmentation; ``None`` draws from torch's global RNG (not
            replayable, and items have no ``"view"``).
        views: number of distinct views per sample; ``None`` gives a new view every epoch.
        view_schedule: ``"cycle"`` (view ``epoch % views``) or ``"random"`` (a seeded draw from
            ``(augment_seed, index, epoch)`` in ``[0, views)``).
        preprocess: deterministic step from a ``source`` item to the un-augmented input (e.g. an image
            file's resize, crop and normalisation); ``None``: items are inputs already.
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
        preprocess: Callable[[Any], Tensor] | None = None,
    ) -> None:
        check_replay(augment_seed, views, view_schedule)
        self.source = source
        self.preprocess = preprocess
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
        return self._plain(x) if view is None else self._augment(x, index, view)

    def _plain(self, x: Any) -> Tensor:
        return _as_input(x if self.preprocess is None else self.preprocess(x), "eval_transform")

    def _transformed(self, x: Any, generator: torch.Generator | None = None) -> Tensor:
        if self.transform is None:
            return self._plain(x)
        if self.transform.raw_input:
            return _as_input(self.transform(x, generator=generator), "train_transform")
        return self.transform(self._plain(x), generator=generator)

    def _augment(self, x: Any, index: int, view: int) -> Tensor:
        if self.transform is None:
            return self._plain(x)
        generator = torch.Generator().manual_seed(replay_seed(self.augment_seed, index, view))
        return self._transformed(x, generator)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = int(self.indices[i])
        x, y = self.source[j]
        if self.augment_seed is not None:
            view = self.view_of(j)
            return {"input": self._augment(x, j, view), "target": int(y), "index": j, "view": view}
        return {"input": self._transformed(x), "target": int(y), "index": j}


def _as_input(x: Any, argument: str) -> Tensor:
    """A plain tensor from what a transform returned (torchvision's ``Image`` becomes a ``Tensor``).

    Raises:
        TypeError: not a tensor (a pipeline without ``ToImage``), naming ``argument``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(
            f"`{argument}` must turn each item into a tensor, got {type(x).__name__}: end a torchvision "
            "pipeline with ToImage, ToDtype(torch.float32, scale=True) and Normalize."
        )
    return x.as_subclass(Tensor)


def check_input_shape(dataset: IndexedDataset, input_shape: tuple[int, ...], argument: str) -> None:
    """Check that the first input of ``dataset`` has the shape the networks are built for.

    Raises:
        ValueError: another shape, naming ``argument`` (the transform that made it).
    """
    if len(dataset) == 0:
        return
    shape = tuple(dataset[0]["input"].shape)
    if shape != tuple(input_shape):
        raise ValueError(
            f"`{argument}` makes inputs of shape {shape}, but the data's `input_shape` (what the networks are "
            f"built for) is {tuple(input_shape)}: make the transform's output size the source's (an "
            "ImageFolder's `image_size`)."
        )


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
    check_val_size(val_size)
    n_val = round(val_size * n) if isinstance(val_size, float) else int(val_size)
    if not 0 <= n_val < n:
        raise ValueError(f"`val_size` must leave training data: got {val_size!r} for {n} training samples.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def check_val_size(val_size: object) -> None:
    """Raise a ValueError naming ``val_size`` unless it is a count (an int >= 0) or a fraction in ``[0, 1)``.

    Example:
        >>> check_val_size(0.1); check_val_size(500)
        >>> check_val_size(1.5)
        Traceback (most recent call last):
        ...
        ValueError: `val_size` must be a count (an integer >= 0) or a fraction in [0, 1) of the training split, got 1.5.
    """
    count = isinstance(val_size, int) and not isinstance(val_size, bool) and val_size >= 0
    if not (count or (isinstance(val_size, float) and 0.0 <= val_size < 1.0)):
        raise ValueError(
            "`val_size` must be a count (an integer >= 0) or a fraction in [0, 1) of the training split, "
            f"got {val_size!r}."
        )


def targets_hash(targets: Tensor) -> str:
    """Short content hash of a target vector (part of a dataset's fingerprint)."""
    return hashlib.sha256(targets.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


class FedCollate:
    """``default_collate``, then the current feed (if any) on the collated batch, where the batch is made
    (the DataLoader's worker processes, or the training process without workers).

    A DataModule gives every loader of a split the same object and sets its feed with :meth:`set`. The
    feed travels to worker processes through shared memory (pickled, at most :attr:`capacity` bytes),
    and each copy checks at every batch whether it changed: Lightning starts the training loader's
    persistent workers before fitting starts (to count a learning-rate schedule's steps), and a feed set
    after that (the soft-target cache sets its feeds when fitting starts) must still reach them.

    Example:
        >>> collate = FedCollate()
        >>> collate([{"index": 1}, {"index": 2}])
        {'index': tensor([1, 2])}
        >>> collate.set(_doubled_index)
        >>> collate([{"index": 1}, {"index": 2}])["twice"]
        tensor([2, 4])
    """

    #: Most bytes a pickled feed may take (a soft-target store's feed: its path and header, a few KB).
    capacity = 1 << 16

    def __init__(self) -> None:
        # [version, length] as int64, then the pickled feed: one shared buffer, inherited or pickled as a handle.
        self._shared = torch.zeros(16 + self.capacity, dtype=torch.uint8).share_memory_()
        self._feed: Feed | None = None
        self._version = 0

    def set(self, feed: Feed | None) -> None:
        """Apply ``feed`` from now on, in every copy of this object (``None``: plain collation).

        Raises:
            ValueError: the pickled feed exceeds :attr:`capacity` bytes.
        """
        data = b"" if feed is None else pickle.dumps(feed)
        if len(data) > self.capacity:
            raise ValueError(
                f"a loader feed pickles to {len(data)} bytes, more than FedCollate.capacity={self.capacity}."
            )
        head = self._shared[:16].view(torch.int64)
        if data:
            self._shared[16 : 16 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        head[1] = len(data)
        head[0] += 1
        self._feed, self._version = feed, int(head[0])

    @property
    def feed(self) -> Feed | None:
        """The feed applied now (unpickled again in this process when another one set a new one)."""
        head = self._shared[:16].view(torch.int64)
        version = int(head[0])
        if version != self._version:
            size = int(head[1])
            self._feed = pickle.loads(self._shared[16 : 16 + size].numpy().tobytes()) if size else None
            self._version = version
        return self._feed

    def __call__(self, items: list[Any]) -> Any:
        batch = default_collate(items)
        feed = self.feed
        return batch if feed is None else feed(batch)


def _doubled_index(batch: dict[str, Any]) -> dict[str, Any]:
    """A feed for :class:`FedCollate`'s example."""
    return {**batch, "twice": 2 * batch["index"]}


class IndexedDataModule(
    L.LightningDataModule, CacheDataModule, NamedClasses, EpochSetting, LoaderOptions, FeedSetting
):
    """Train/validation/test loaders over one :class:`ClassificationSource`.

    It is what the soft-target cache needs from data (:mod:`kd_lightning.cache.protocols`): a
    ``CacheDataModule`` (``<split>_set``, :meth:`fingerprint`, ``num_classes``), with
    :meth:`set_epoch`, loader settings and :meth:`set_feed` (the cache's soft targets gathered in the
    loaders' workers); and it names its classes
    (:class:`~kd_lightning.contracts.NamedClasses`, read by the dashboard and the clustering).

    The validation split is the source's own when it has one (an image folder's ``val/``), else it is
    carved from the training file with its own seed (``split_seed``), so it is the same for every run,
    model and process. A source without a test split (:attr:`ClassificationSource.has_test` false) is
    tested on the validation split.

    Transforms are this package's tensor augmentations (:mod:`~kd_lightning.datamodules.transforms`), which
    take the un-augmented input, or torchvision ``transforms.v2`` pipelines (``class_path:
    torchvision.transforms.v2.Compose``), which take the source's item itself: for an image folder, the
    decoded picture, so that ``RandomResizedCrop`` crops the full image. Both replay their views with
    ``augment_seed``.

    Args:
        source: the dataset (``class_path`` in YAML), e.g. ``kd_lightning.datamodules.FashionMNIST``.
        batch_size: training batch size per process.
        eval_batch_size: validation/test/predict batch size per process.
        val_size: validation samples carved from the training file: a count, or a fraction in
            ``[0, 1)``; ignored when the source has its own validation split.
        split_seed: seed of the train/validation split.
        num_workers: DataLoader workers (0 loads in the main process); ``None`` (default): 0 on a CPU, on a
            GPU as many as the CPUs given to each training process allow, one left for the process itself
            (:func:`~kd_lightning.datamodules.loading.loader_options`; SLURM's ``cpus-per-task`` counts).
        pin_memory: pin host memory; ``None`` (default): exactly when training on a GPU.
        persistent_workers: keep the workers between epochs; ``None`` (default): whenever there are workers.
        prefetch_factor: batches each worker loads ahead; ``None`` (default): 4 on a GPU, else PyTorch's 2.
        train_transform: augmentation applied to training inputs only: a
            :class:`~kd_lightning.datamodules.transforms.Transform` or a torchvision ``v2`` pipeline.
        eval_transform: a torchvision ``v2`` pipeline making the un-augmented input of a source's item
            (validation, test, and the soft-target cache's fixed mode), replacing the source's own
            ``preprocess`` (an image folder's resize, centre crop and normalisation). It must output
            ``input_shape``.
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
        val_size: int | float = 0.1,
        split_seed: int = 0,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        train_transform: Transform | v2.Transform | None = None,
        train_fraction: float = 1.0,
        augment_seed: int | None = None,
        augment_views: int | None = None,
        view_schedule: Literal["cycle", "random"] = "cycle",
        omit_classes: Sequence[int] = (),
        eval_transform: v2.Transform | None = None,
        persistent_workers: bool | None = None,
        prefetch_factor: int | None = None,
    ) -> None:
        super().__init__()
        check_replay(augment_seed, augment_views, view_schedule)
        check_val_size(val_size)
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
        # What the user asked for (None: the policy decides); checked now, resolved per Trainer.
        self.requested_loader: dict[str, Any] = dict(
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            prefetch_factor=prefetch_factor,
        )
        loader_options(**self.requested_loader, gpu=False, cpus=1)
        # A torchvision pipeline becomes a replayable Transform on the source's items.
        self.train_transform = (
            TorchvisionTransform(train_transform)
            if isinstance(train_transform, v2.Transform)
            else train_transform
        )
        self.eval_transform = eval_transform
        self.train_fraction = train_fraction
        self.augment_seed = augment_seed
        self.augment_views = augment_views
        self.view_schedule = view_schedule
        self.omit_classes = omit_classes
        self.train_set: IndexedDataset | None = None
        self.val_set: IndexedDataset | None = None
        self.test_set: IndexedDataset | None = None
        self._collate = {split: FedCollate() for split in SPLITS}  # one per split, shared by its loaders

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

    @property
    def preprocess(self) -> Callable[[Any], Tensor] | None:
        """What makes the un-augmented input of a source's item: ``eval_transform``, else the source's own."""
        return self.eval_transform if self.eval_transform is not None else self.source.preprocess

    def setup(self, stage: str | None = None) -> None:
        needs_val = stage in (None, "fit", "validate") or (
            stage in ("test", "predict") and not self.source.has_test
        )
        if self.train_set is None and needs_val:
            data, targets = self.source.load(train=True)
            own_val = self.source.load_val()
            if own_val is None:
                train_idx, val_idx = split_indices(len(targets), self.val_size, self.split_seed)
                val_data, val_targets = data, targets
            else:
                train_idx, (val_data, val_targets) = torch.arange(len(targets)), own_val
                val_idx = torch.arange(len(val_targets))
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
                preprocess=self.preprocess,
            )
            self.val_set = IndexedDataset(val_data, val_targets, val_idx, preprocess=self.preprocess)
            check_input_shape(self.val_set, self.input_shape, "eval_transform")
            check_input_shape(self.train_set, self.input_shape, "train_transform")
        if self.test_set is None and stage in (None, "test", "predict"):
            if self.source.has_test:
                data, targets = self.source.load(train=False)
                self.test_set = IndexedDataset(
                    data, targets, torch.arange(len(targets)), preprocess=self.preprocess
                )
            else:  # e.g. an image folder with train/ only: the test split is the validation split
                self.test_set = self.val_set

    @property
    def loader_settings(self) -> LoaderSettings:
        """The DataLoader settings of every split: the user's, and the policy's for those left ``None``
        (:func:`~kd_lightning.datamodules.loading.loader_options`), for the attached Trainer's accelerator
        (a CPU without one)."""
        trainer = self.trainer
        gpu = trainer is not None and isinstance(trainer.accelerator, CUDAAccelerator)
        devices = trainer.num_devices if trainer is not None else 1
        return loader_options(
            **self.requested_loader, gpu=gpu, cpus=cpus_given(), processes=processes_sharing_cpus(devices)
        )

    @property
    def num_workers(self) -> int:
        """DataLoader workers, as resolved (:attr:`loader_settings`)."""
        return self.loader_settings.num_workers

    @property
    def pin_memory(self) -> bool:
        """Whether batches are pinned, as resolved (:attr:`loader_settings`)."""
        return self.loader_settings.pin_memory

    def set_feed(self, split: str, feed: Feed | None) -> None:
        """Apply ``feed`` to every collated batch of ``split``'s loaders, where the batch is made (their
        worker processes), from their next iterator on (``None`` removes it). The soft-target cache serves
        its stores this way.

        Raises:
            ValueError: ``split`` is not ``"train"``, ``"val"`` or ``"test"``.
        """
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")
        self._collate[split].set(feed)

    def loader_kwargs(self, split: str) -> dict[str, Any]:
        """DataLoader arguments of ``split``'s loaders: :attr:`loader_settings`, and the collate function
        that applies the split's feed (:meth:`set_feed`)."""
        return {**self.loader_settings.as_kwargs(), "collate_fn": self._collate[split]}

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        dataset = {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
        if dataset is None:
            raise RuntimeError("call `setup()` before asking for a dataloader.")
        # Shuffled: RandomSampler's order, resumable mid-epoch from a checkpoint (datamodules/resumable.py).
        kind = ResumableLoader if shuffle else DataLoader
        return kind(dataset, batch_size=batch_size, shuffle=shuffle, **self.loader_kwargs(split))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

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
