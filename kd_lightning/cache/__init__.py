"""The soft-target cache without Lightning: a teacher's outputs filled into a store, checked, served.

One module per role, over :mod:`kd_lightning.store` (the format):

- :mod:`~kd_lightning.cache.protocols`: what the cache needs from the data (:class:`CacheableDataset`,
  :class:`ReplayableDataset`, :class:`CacheDataModule`, ...) and from the processes that build a store
  together (:class:`Collective`) in a precision (:class:`InferencePrecision`);
- :mod:`~kd_lightning.cache.identity`: what a store is built from (:class:`StoreIdentity`,
  :func:`teacher_identity`) and whether a store on disk is the one needed (:func:`check_store`);
- :mod:`~kd_lightning.cache.fill`: :func:`fill_store`, a teacher run over a dataset into a store, on
  one process or many, usable without a Trainer;
- :mod:`~kd_lightning.cache.serve`: a batch's stored targets, where the batch is made
  (:class:`StoreFeed`, in the DataLoader's workers) or in the training process (:func:`soft_targets`),
  hybrid with a live teacher for views the store lacks.

The Lightning callback ``kd_lightning.callbacks.SoftTargetCache`` drives these during a fit; the
workflow ``kd_lightning.workflows.fill_store`` fills the stores of a DataModule from a teacher
checkpoint, from the command line.

Example, one process, no Trainer:

    >>> import tempfile, torch
    >>> from torch import nn
    >>> from kd_lightning.store import Encoding
    >>> class Rows:  # a CacheableDataset: rows 3, 5, 7 of some source split
    ...     indices = torch.tensor([3, 5, 7])
    ...     def __len__(self): return 3
    ...     def input_of(self, index, view=None): return torch.full((2,), float(index))
    >>> rows, teacher = Rows(), nn.Linear(2, 4)
    >>> identity = StoreIdentity.of(rows, {"dataset": "toy", "split": "train"}, num_classes=4,
    ...                             encoding=Encoding("logits", "float32"))
    >>> store = fill_store(teacher, rows, tempfile.mkdtemp() + "/train", identity, progress=False)
    >>> logits, hits = soft_targets(store, {"index": torch.tensor([7, 3])}, "cpu")
    >>> torch.allclose(logits, teacher(torch.tensor([[7.0, 7.0], [3.0, 3.0]]))), hits
    (True, 2)
"""

from __future__ import annotations

from kd_lightning.cache.fill import BuildStats, build_jobs, check_buildable, fill_store
from kd_lightning.cache.identity import (
    SAMPLED_INPUTS,
    StoreCheck,
    StoreIdentity,
    check_replayable,
    check_store,
    teacher_identity,
)
from kd_lightning.cache.protocols import (
    SPLITS,
    CacheableDataset,
    CacheDataModule,
    ClassCount,
    Collective,
    EpochSetting,
    Feed,
    FeedSetting,
    FullPrecision,
    InferencePrecision,
    LiveTeacherNeed,
    LoaderOptions,
    NamedPrecision,
    ReplayableDataset,
    SingleProcess,
    TeacherCarrier,
    check_datamodule,
    split_dataset,
)
from kd_lightning.cache.serve import FED, SoftTargets, StoreFeed, fill_missing, gather, soft_targets

__all__ = [
    "FED",
    "SAMPLED_INPUTS",
    "SPLITS",
    "BuildStats",
    "CacheDataModule",
    "CacheableDataset",
    "ClassCount",
    "Collective",
    "EpochSetting",
    "Feed",
    "FeedSetting",
    "FullPrecision",
    "InferencePrecision",
    "LoaderOptions",
    "NamedPrecision",
    "ReplayableDataset",
    "SingleProcess",
    "SoftTargets",
    "StoreCheck",
    "StoreFeed",
    "StoreIdentity",
    "LiveTeacherNeed",
    "TeacherCarrier",
    "build_jobs",
    "check_buildable",
    "check_datamodule",
    "check_replayable",
    "check_store",
    "fill_missing",
    "fill_store",
    "gather",
    "soft_targets",
    "split_dataset",
    "teacher_identity",
]
