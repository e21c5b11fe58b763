"""What the soft-target cache needs from the data and from the process group, as ``Protocol``\\ s.

The cache reads a split's samples by their index (:class:`CacheableDataset`), replays augmentation
views (:class:`ReplayableDataset`), finds each split's dataset and identity on a DataModule
(:class:`CacheDataModule`), and, where a DataModule offers them, sets its epoch
(:class:`EpochSetting`), its loader settings (:class:`LoaderOptions`) and a feed applied where its
batches are made (:class:`FeedSetting`); from the model it needs the
teacher (:class:`TeacherCarrier`) and the number of classes (:class:`ClassCount`). A build runs on one or many
processes (:class:`Collective`) in a numeric precision (:class:`InferencePrecision`); one process in
full precision (:class:`SingleProcess`, :class:`FullPrecision`) needs no Trainer.

``kd_lightning.datamodules.IndexedDataset`` and ``IndexedDataModule`` subclass these protocols
explicitly. Checks use ``isinstance`` with the runtime-checkable protocols (which see that the members
exist, not their types), and errors name what is missing and what was given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol, TypeVar, runtime_checkable

from torch import Tensor, nn

T = TypeVar("T")

#: The splits a DataModule may serve, with the attribute holding each split's dataset.
SPLITS = ("train", "val", "test")


@runtime_checkable
class CacheableDataset(Protocol):
    """One split of a dataset whose samples the teacher can be run on, row by row.

    Attributes:
        indices: int64 ``(L,)`` the sample index (position in the source split) of each row, in order.
    """

    indices: Tensor

    def __len__(self) -> int: ...

    def input_of(self, index: int, view: int | None = None) -> Tensor:
        """The input of sample ``index``: augmentation view ``view``, or un-augmented for ``None``."""
        ...


@runtime_checkable
class ReplayableDataset(CacheableDataset, Protocol):
    """A split whose augmentation views can be replayed: what augmentation-consistent stores need.

    Attributes:
        replayable: whether each item's augmentation is a function of ``(augment_seed, index, view)``.
        augment_seed: the seed of those augmentations (recorded in a store's header).
        transform: the augmentation (its description is recorded in a store's header).
        views: how many distinct views the data serves per sample (``None``: a new view every epoch).
    """

    augment_seed: int | None
    transform: Any
    views: int | None

    @property
    def replayable(self) -> bool: ...


@runtime_checkable
class CacheDataModule(Protocol):
    """A DataModule whose splits can be cached: a dataset per split, and each split's identity.

    Attributes:
        train_set, val_set, test_set: each split's dataset, ``None`` until ``setup`` made it.
    """

    train_set: CacheableDataset | None
    val_set: CacheableDataset | None
    test_set: CacheableDataset | None

    @property
    def num_classes(self) -> int: ...

    def fingerprint(self, split: str) -> Mapping[str, Any]:
        """Identity of one split: dataset name, split, length and a hash of the targets at least."""
        ...


@runtime_checkable
class EpochSetting(Protocol):
    """Data whose augmentation views depend on the epoch (replayable augmentation)."""

    def set_epoch(self, epoch: int) -> None: ...


@runtime_checkable
class LoaderOptions(Protocol):
    """Data loading settings a build follows (workers, pinned memory)."""

    num_workers: int
    pin_memory: bool


#: What a DataLoader applies to each collated batch of a split (:class:`FeedSetting`).
Feed = Callable[[dict[str, Any]], dict[str, Any]]


@runtime_checkable
class FeedSetting(Protocol):
    """Data whose loaders apply a feed to every collated batch of a split, where the batch is made.

    The soft-target cache installs one (:class:`~kd_lightning.cache.serve.StoreFeed`) so that soft
    targets are gathered in the DataLoader's workers and travel with the batch.
    """

    def set_feed(self, split: str, feed: Feed | None) -> None:
        """Apply ``feed`` to the batches of ``split``'s loaders made from now on (``None``: no feed)."""
        ...


@runtime_checkable
class TeacherCarrier(Protocol):
    """A model that carries the teacher it distils from (``None`` when its soft targets come from a store).

    A LightningModule holds its teacher as a submodule, which Python 3.12+'s ``isinstance`` with a protocol
    (``inspect.getattr_static``) does not see: such a module subclasses this protocol explicitly, as
    ``kd_lightning.modules.DistillationModule`` does.
    """

    teacher: nn.Module | None


@runtime_checkable
class LiveTeacherNeed(Protocol):
    """A model whose training may need its teacher's forward pass itself, not only the teacher's logits
    (e.g. an objective on intermediate features): a soft-target store cannot serve it then."""

    def live_teacher_reason(self) -> str | None:
        """Why stored soft targets do not suffice, or ``None`` when they do."""
        ...


@runtime_checkable
class ClassCount(Protocol):
    """A model or data with a number of classes."""

    num_classes: int


class Collective(Protocol):
    """The processes that build one store together (Lightning's Trainer and strategy, or one process).

    Attributes:
        global_rank: this process's rank; rank 0 creates, commits and logs.
        world_size: the number of processes.
    """

    @property
    def global_rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def broadcast(self, obj: T, src: int = 0) -> T:
        """``obj`` as given on rank ``src``, on every process."""
        ...

    def barrier(self, name: str | None = None) -> None:
        """Wait until every process gets here."""
        ...

    def all_true(self, decision: bool) -> bool:
        """Whether ``decision`` is true on every process."""
        ...


class SingleProcess:
    """A :class:`Collective` of one process: a build without a Trainer or a process group.

    Example:
        >>> one = SingleProcess()
        >>> one.global_rank, one.world_size, one.broadcast("token"), one.all_true(False)
        (0, 1, 'token', False)
    """

    global_rank = 0
    world_size = 1

    def broadcast(self, obj: T, src: int = 0) -> T:
        return obj

    def barrier(self, name: str | None = None) -> None:
        pass

    def all_true(self, decision: bool) -> bool:
        return decision


class InferencePrecision(Protocol):
    """The numeric precision the teacher runs in while a store is built.

    Attributes:
        name: Lightning's name of the precision, e.g. ``"32-true"`` or ``"bf16-mixed"`` (recorded in the
            store's header).
    """

    name: str

    def forward_context(self) -> AbstractContextManager[Any]:
        """The context the teacher's forward pass runs in (autocast for mixed precision)."""
        ...

    def convert_input(self, data: Tensor) -> Tensor:
        """The input as the teacher takes it (cast for ``*-true`` precisions)."""
        ...


class FullPrecision:
    """:class:`InferencePrecision` of a teacher run as it is, in fp32 (``"32-true"``).

    Example:
        >>> import torch
        >>> p = FullPrecision()
        >>> with p.forward_context():
        ...     p.name, p.convert_input(torch.ones(1)).dtype
        ('32-true', torch.float32)
    """

    name = "32-true"

    def forward_context(self) -> AbstractContextManager[Any]:
        return nullcontext()

    def convert_input(self, data: Tensor) -> Tensor:
        return data


class NamedPrecision:
    """:class:`InferencePrecision` of a Lightning precision plugin (``trainer.precision_plugin``, or one
    made for a build without a Trainer), with its name.

    Args:
        name: Lightning's name of the precision, e.g. ``str(trainer.precision)``.
        plugin: anything with ``forward_context()`` and ``convert_input(data)``, as Lightning's plugins.
    """

    def __init__(self, name: str, plugin: Any) -> None:
        self.name = name
        self.plugin = plugin

    def forward_context(self) -> AbstractContextManager[Any]:
        return self.plugin.forward_context()

    def convert_input(self, data: Tensor) -> Tensor:
        return self.plugin.convert_input(data)


def split_dataset(datamodule: CacheDataModule, split: str) -> CacheableDataset:
    """The dataset of ``split`` (``"train"``, ``"val"`` or ``"test"``) on ``datamodule``, after its setup.

    Raises:
        ValueError: ``split`` is not one of :data:`SPLITS`, or the DataModule has no usable dataset for
            it (none yet, or one without ``indices`` and ``input_of``); the message names what was given.
    """
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")
    dataset = {"train": datamodule.train_set, "val": datamodule.val_set, "test": datamodule.test_set}[split]
    if not isinstance(dataset, CacheableDataset):
        raise ValueError(
            f"the DataModule has no usable `{split}_set` for split {split!r} (needs a CacheableDataset: "
            "`indices` and `input_of(index, view)`, like kd_lightning.datamodules.IndexedDataset); got "
            f"{type(dataset).__name__}."
        )
    return dataset


def check_datamodule(datamodule: object) -> CacheDataModule:
    """``datamodule`` as a :class:`CacheDataModule`, or a ValueError naming what it lacks.

    Example:
        >>> check_datamodule(None)
        Traceback (most recent call last):
        ...
        ValueError: the soft-target cache needs the data from a DataModule with `fingerprint(split)`, `num_classes` and `<split>_set` datasets (a CacheDataModule, e.g. kd_lightning.datamodules.IndexedDataModule), passed as `trainer.fit(model, datamodule=...)`; got None.
    """
    if not isinstance(datamodule, CacheDataModule):
        given = None if datamodule is None else type(datamodule).__name__
        raise ValueError(
            "the soft-target cache needs the data from a DataModule with `fingerprint(split)`, `num_classes` "
            "and `<split>_set` datasets (a CacheDataModule, e.g. kd_lightning.datamodules.IndexedDataModule), "
            f"passed as `trainer.fit(model, datamodule=...)`; got {given}."
        )
    return datamodule
