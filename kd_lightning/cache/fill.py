"""Filling a soft-target store: a teacher run over a dataset's rows, on one process or many.

:func:`fill_store` is a plain function (no Trainer needed): it checks that the store can be written
and that what it replaces holds only a store's own files, runs the teacher under
``torch.inference_mode()`` ``batch_size`` rows at a time, and publishes the store atomically
(:class:`~kd_lightning.store.StoreWriter`). Under a :class:`~kd_lightning.cache.protocols.Collective`
of several processes (the ``SoftTargetCache`` callback passes its Trainer's), rank 0 creates the
store, every rank writes the rows of its own batches, and rank 0 commits; batches are cut from the rows
alone and dealt round-robin, so the store is bit-for-bit the one a single process builds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from kd_lightning.cache.identity import StoreIdentity, teacher_identity
from kd_lightning.cache.protocols import (
    CacheableDataset,
    Collective,
    FullPrecision,
    InferencePrecision,
    SingleProcess,
)
from kd_lightning.store import INDEX, SoftTargetStore, StoreError, StoreWriter, check_can_build, new_token

#: One batch of a build: ``(view, first row, row after the last)``.
Job = tuple[int, int, int]


def check_buildable(path: str | Path, collective: Collective | None = None) -> None:
    """Before a teacher runs: the store at ``path`` can be written, and replacing it loses nothing.

    Checked on every process of ``collective`` (one shared filesystem, or not); all raise if any fails.

    Raises:
        StoreError: the directory cannot be created or written, a file stands where it should be, or
            the store it would replace holds a file the store did not write (named; nothing is deleted).
    """
    collective = SingleProcess() if collective is None else collective
    error = None
    try:
        check_can_build(path)
    except StoreError as err:
        error = err
    if not collective.all_true(error is None):
        if error is not None:
            raise error
        raise StoreError(
            f"the soft-target store {str(path)!r} cannot be built on another process (see its error)."
        )


def build_jobs(length: int, views: int, batch_size: int) -> list[Job]:
    """The batches of a build of ``length`` rows and ``views`` views, whatever the number of processes.

    Rank ``r`` of ``w`` computes ``jobs[r::w]``.

    Example:
        >>> build_jobs(5, views=2, batch_size=2)
        [(0, 0, 2), (0, 2, 4), (0, 4, 5), (1, 0, 2), (1, 2, 4), (1, 4, 5)]
    """
    return [(v, s, min(s + batch_size, length)) for v in range(views) for s in range(0, length, batch_size)]


def fill_store(
    teacher: nn.Module,
    dataset: CacheableDataset,
    path: str | Path,
    identity: StoreIdentity,
    *,
    teacher_record: Mapping[str, Any] | None = None,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    precision: InferencePrecision | None = None,
    collective: Collective | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> SoftTargetStore:
    """Run ``teacher`` over ``dataset`` and publish its soft targets as the store at ``path``.

    Replaces a store already there (atomically: the old one stays until the new one is complete), and
    removes leftovers of killed builds of the same store. Call it on every process of ``collective``.

    Args:
        teacher: the network, on ``device`` and already in ``precision`` (its parameters' dtype).
        dataset: the split's rows (:class:`~kd_lightning.cache.protocols.CacheableDataset`).
        path: the store's directory; on a filesystem every process sees.
        identity: what the store is built from (:meth:`StoreIdentity.of`), with its encoding and views.
        teacher_record: the header's ``teacher`` entry (:func:`teacher_identity`, to record a checkpoint
            or the fingerprint taken before a precision conversion); default: ``teacher_identity(teacher)``.
        batch_size: rows per teacher batch.
        device: where the teacher runs.
        precision: the precision context of the forward pass; default fp32 as is.
        collective: the processes building together; default this process alone.
        num_workers: DataLoader workers reading the inputs.
        pin_memory: pin host memory (used on CUDA only).
        progress: show a progress bar (on rank 0).
        log: where rank 0 reports leftovers removed and the build's throughput (e.g. ``print``).

    Returns:
        the published store, opened without a second verification pass (the commit checked every byte).

    Raises:
        ValueError: ``batch_size`` is not a positive integer.
        StoreError: the store cannot be written or replaced (before the teacher runs), or the teacher's
            outputs are not finite (nothing is published).
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    path, device = Path(path), torch.device(device)
    precision = FullPrecision() if precision is None else precision
    collective = SingleProcess() if collective is None else collective
    rank, world = collective.global_rank, collective.world_size
    check_buildable(path, collective)
    start_time = time.perf_counter()
    record = teacher_identity(teacher) if teacher_record is None else dict(teacher_record)
    header = {"teacher": record, **identity.header()}
    views, length = identity.num_views, len(dataset.indices)
    token = collective.broadcast(new_token() if rank == 0 else None, src=0)
    if rank == 0:
        writer = StoreWriter.create(
            path, identity.encoding, identity.num_classes, dataset.indices, views, header, token
        )
        for leftover in writer.removed_leftovers:
            _say(log, f"removed {str(leftover)!r}, left by an interrupted build.")
    collective.barrier("soft_target_cache:create")
    if rank != 0:
        writer = StoreWriter.attach(path, token)
    mine = build_jobs(length, views, batch_size)[rank::world]
    try:
        _run_teacher(
            teacher,
            _TeacherInputs(dataset, augmented=identity.views is not None),
            mine,
            writer,
            device=device,
            precision=precision,
            num_workers=num_workers,
            pin_memory=pin_memory,
            progress=progress and rank == 0,
            desc=f"soft targets ({identity.dataset.get('split', path.name)})",
        )
        writer.close()
    except BaseException:
        if rank == 0:
            writer.abort()  # an interrupted build leaves nothing that looks like a store
        raise
    collective.barrier("soft_target_cache:written")
    if rank == 0:
        seconds = time.perf_counter() - start_time
        writer.commit(
            {
                "precision": precision.name,
                "world_size": world,
                "batch_size": batch_size,
                "seconds": round(seconds, 3),
            }
        )
    collective.barrier("soft_target_cache:committed")
    store = SoftTargetStore.open(path, verify=False)  # the commit has just hashed and checked it
    if rank == 0 and log is not None:
        stats = BuildStats.of(store, time.perf_counter() - start_time)
        log(
            f"built {str(path)!r}: {length} samples x {views} views in {stats.seconds:.1f} s "
            f"({length * views / stats.seconds:.0f} samples/s on {world} process(es)), "
            f"{stats.bytes / max(1, length * views):.1f} bytes per sample and view."
        )
    return store


@dataclass(frozen=True)
class BuildStats:
    """What a build made: samples, views, seconds, and bytes of soft targets (the index apart)."""

    samples: int
    views: int
    seconds: float
    bytes: int

    @classmethod
    def of(cls, store: SoftTargetStore, seconds: float) -> BuildStats:
        """The statistics of ``store``, built in ``seconds``."""
        # Soft targets only: the 8-byte sample index per row is the same for every format.
        size = sum(
            math.prod(spec["shape"]) * np.dtype(spec["dtype"]).itemsize
            for name, spec in store.header["arrays"].items()
            if name != INDEX
        )
        return cls(len(store.indices), store.num_views, seconds, size)

    def as_dict(self) -> dict[str, float]:
        """``{"samples", "views", "seconds", "bytes"}``."""
        return {"samples": self.samples, "views": self.views, "seconds": self.seconds, "bytes": self.bytes}


def _say(log: Callable[[str], None] | None, message: str) -> None:
    if log is not None:
        log(message)


def _run_teacher(
    teacher: nn.Module,
    inputs: _TeacherInputs,
    jobs: list[Job],
    writer: StoreWriter,
    *,
    device: torch.device,
    precision: InferencePrecision,
    num_workers: int,
    pin_memory: bool,
    progress: bool,
    desc: str,
) -> None:
    loader = DataLoader(
        inputs,
        batch_sampler=_Jobs(jobs),
        num_workers=num_workers,
        pin_memory=pin_memory and device.type == "cuda",
        # Its own generator: building must not move the global RNG a training run shuffles with.
        generator=torch.Generator(),
    )
    samples = sum(stop - start for _, start, stop in jobs)
    # disable=None: a bar on a terminal only (in a log file its redraws would be noise).
    bar = tqdm(
        total=samples,
        desc=desc,
        unit="sample",
        dynamic_ncols=True,
        leave=False,
        disable=None if progress else True,
    )
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.inference_mode(), precision.forward_context():
            for (view, start, _), x in zip(jobs, loader, strict=True):
                x = precision.convert_input(x.to(device, non_blocking=True))
                writer.write(view, start, teacher(x).float())
                bar.update(x.shape[0])
    finally:
        bar.close()
        teacher.train(was_training)


class _TeacherInputs(Dataset):
    """What the teacher sees for a ``(view, row)`` key: that replayed view, or the un-augmented input."""

    def __init__(self, dataset: CacheableDataset, augmented: bool) -> None:
        self.dataset = dataset
        self.augmented = augmented

    def __len__(self) -> int:
        return len(self.dataset.indices)

    def __getitem__(self, key: tuple[int, int]) -> Tensor:
        view, row = key
        index = int(self.dataset.indices[row])
        return self.dataset.input_of(index, view if self.augmented else None)


class _Jobs(Sampler):
    """Batches of ``(view, row)`` keys, one per ``(view, start, stop)`` job."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for view, start, stop in self.jobs:
            yield [(view, row) for row in range(start, stop)]
