"""Serving a store's soft targets to a batch, keyed by its ``index`` (and ``view``).

Two places can serve them, with the same values:

- **where the batch is made** (:class:`StoreFeed`): a DataLoader's collate function gathers the
  batch's rows from the memory-mapped store, in the loader's worker processes, into
  ``batch["soft_targets"]`` (:class:`SoftTargets`), so they arrive with the inputs, prefetched (and
  pinned, when the loader pins) and the training step does no store I/O; rows whose view the store
  lacks are flagged there for the training process to compute (:func:`fill_missing`);
- **in the training process** (:func:`soft_targets`): the same gather after the batch reached the
  module's device, then the live-teacher fallback for the views the store lacks.

Both are one gather per array of the store (:meth:`~kd_lightning.store.SoftTargetStore.lookup`), as
fp32 ``(N, C)``. A store of augmentation views serves each row's own view; views the store lacks are
computed by a fallback (the live teacher), never replaced by another view's targets.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kd_lightning.store import SoftTargetStore, StoreError

#: Batch key of the :class:`SoftTargets` a :class:`StoreFeed` adds; the cache replaces it by
#: ``batch["teacher_logits"]`` before the step.
FED = "soft_targets"


def gather(
    store: SoftTargetStore, batch: Mapping[str, Any], *, by_view: bool = False
) -> tuple[Tensor, Tensor | None]:
    """The stored soft targets of ``batch``'s samples, on the CPU: one gather per array of the store.

    Args:
        store: the open store of the batch's split.
        batch: a batch of the contract of docs/architecture.md: a dict with ``index`` (and ``view`` when
            ``by_view``).
        by_view: serve each row's augmentation view ``batch["view"]`` (augmentation-consistent mode);
            ``False`` serves view 0, the un-augmented input's targets (fixed mode).

    Returns:
        ``(logits, missing)``: fp32 ``(N, C)``, and ``None`` when the store holds every row, else the bool
        ``(N,)`` rows whose view the store lacks (their logits are NaN: never another view's targets).

    Raises:
        ValueError: ``batch`` is not a dict with an ``index``, or ``by_view`` and it has no ``view``.
    """
    if not isinstance(batch, Mapping) or "index" not in batch:
        keys = list(batch) if isinstance(batch, Mapping) else None
        raise ValueError(
            "soft targets are served to batches that are dicts with an 'index' entry (the batch contract of "
            f"docs/architecture.md); got {type(batch).__name__} with keys {keys}."
        )
    index = batch["index"]
    if not by_view:
        return store.lookup(index), None
    if "view" not in batch:
        raise ValueError(
            f"the store {str(store.path)!r} holds {store.num_views} augmentation view(s) per sample, and the "
            "batches carry no 'view'; the DataModule's augmentation must be replayable (`augment_seed`)."
        )
    view = batch["view"].cpu()
    hit = view < store.num_views
    if bool(hit.all()):
        return store.lookup(index, view), None
    logits = torch.full((len(view), store.num_classes), float("nan"))
    if bool(hit.any()):
        logits[hit] = store.lookup(index.cpu()[hit], view[hit])
    return logits, ~hit


def fill_missing(
    logits: Tensor,
    missing: Tensor | None,
    inputs: Tensor,
    fallback: Callable[[Tensor], Tensor] | None,
    store: str,
) -> int:
    """Compute in place the rows of ``logits`` the store lacks; return how many rows the store served.

    Args:
        logits: ``(N, C)`` soft targets from :func:`gather` (on any device).
        missing: bool ``(N,)`` rows to compute, or ``None`` (none).
        inputs: the batch's inputs, on the device of ``fallback``.
        fallback: the teacher's logits for inputs (the live teacher).
        store: the store, as the error names it.

    Raises:
        ValueError: rows are missing and there is no ``fallback``.
    """
    if missing is None:
        return len(logits)
    if fallback is None:
        raise ValueError(f"views that are not in the store {store} and no `fallback` computes them.")
    miss = missing.to(logits.device)
    logits[miss] = fallback(inputs[miss.to(inputs.device)]).to(logits.dtype)
    return len(logits) - int(miss.sum())


def soft_targets(
    store: SoftTargetStore,
    batch: Mapping[str, Any],
    device: torch.device | str,
    *,
    by_view: bool = False,
    fallback: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, int]:
    """The stored soft targets of ``batch``'s samples, and how many rows came from the store.

    Args:
        store: the open store of the batch's split.
        batch: a batch of the contract of docs/architecture.md: a dict with ``index`` (and ``view``
            and ``input`` when ``by_view``).
        device: where the result goes.
        by_view: serve each row's augmentation view ``batch["view"]`` (augmentation-consistent mode);
            ``False`` serves view 0, the un-augmented input's targets (fixed mode).
        fallback: the teacher's logits for the inputs of rows whose view the store lacks (hybrid use);
            called with those rows of ``batch["input"]``.

    Returns:
        ``(logits, hits)``: fp32 ``(N, C)`` on ``device``, and the number of rows served from the store.

    Raises:
        ValueError: ``batch`` is not a dict with an ``index``; ``by_view`` and it has no ``view``; or
            views the store lacks and no ``fallback``.
    """
    logits, missing = gather(store, batch, by_view=by_view)
    if missing is not None and fallback is None:
        raise ValueError(
            f"views >= {store.num_views} are not in the store {str(store.path)!r}, and no `fallback` computes "
            "them."
        )
    logits = logits.to(device, non_blocking=True)
    hits = fill_missing(logits, missing, batch.get("input"), fallback, repr(str(store.path)))
    return logits, hits


class SoftTargets:
    """A batch's soft targets as :class:`StoreFeed` gathered them: fp32 ``logits`` ``(N, C)`` and the
    ``missing`` rows (bool ``(N,)``, or ``None``) the store lacks, whose logits are NaN.

    Pinned (``pin_memory``) and moved (``to``) with the batch by the DataLoader and by Lightning, but
    not a tensor of the batch: a precision plugin that converts a batch's floating tensors (``bf16-true``)
    leaves it alone, so the soft targets stay fp32 exactly as the store decodes them.
    """

    def __init__(self, logits: Tensor, missing: Tensor | None = None) -> None:
        self.logits = logits
        self.missing = missing

    def __repr__(self) -> str:
        missing = None if self.missing is None else int(self.missing.sum())
        return f"SoftTargets({tuple(self.logits.shape)}, {self.logits.device}, missing={missing})"

    def to(self, device: torch.device | str, non_blocking: bool = True) -> SoftTargets:
        """On ``device`` (asynchronously from pinned memory)."""
        missing = None if self.missing is None else self.missing.to(device, non_blocking=non_blocking)
        return SoftTargets(self.logits.to(device, non_blocking=non_blocking), missing)

    def pin_memory(self) -> SoftTargets:
        """In page-locked host memory (what a DataLoader with ``pin_memory`` asks of each batch entry)."""
        return SoftTargets(
            self.logits.pin_memory(), None if self.missing is None else self.missing.pin_memory()
        )


class StoreFeed:
    """A store served where batches are made: ``feed(batch)`` adds ``batch["soft_targets"]``.

    A DataLoader applies it to each collated batch (``IndexedDataModule.set_feed``), in its worker
    processes when it has any: one vectorised gather per batch from the memory-mapped store, as
    :class:`SoftTargets` (fp32 ``(N, C)`` on the CPU, and the rows whose view the store lacks); the
    loader pins them with the rest of the batch.

    It pickles without its open store: a worker started by ``spawn`` (or a copy sent anywhere) opens the
    store again by its path, without a second verification pass, and refuses it if its header is no
    longer the one this feed was made from. A forked worker shares the parent's memory map.

    Attributes:
        path: the store's directory.
        by_view: serve each row's ``batch["view"]`` (augmentation-consistent mode); else view 0.
        seconds: time spent gathering in *this* process (the training process's copy counts only the
            batches collated there, i.e. with ``num_workers=0``).
        batches: batches gathered in this process.

    Example:
        >>> import pickle, tempfile, numpy as np
        >>> from kd_lightning.store import Encoding, StoreWriter
        >>> writer = StoreWriter.create(tempfile.mkdtemp() + "/train", Encoding("logits", "float32"), 3,
        ...                             np.array([4, 9]), 1, {})
        >>> writer.write(0, 0, torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
        >>> feed = StoreFeed(writer.commit({}))
        >>> pickle.loads(pickle.dumps(feed))({"index": torch.tensor([9])})["soft_targets"].logits
        tensor([[4., 5., 6.]])
    """

    def __init__(self, store: SoftTargetStore, by_view: bool = False) -> None:
        self.path = Path(store.path)
        self.by_view = by_view
        self.seconds = 0.0
        self.batches = 0
        self._header = store.header
        self._store: SoftTargetStore | None = store

    def __getstate__(self) -> dict[str, Any]:
        # A memory map pickles as a copy of the whole array: send the path, and reopen it there.
        return {**self.__dict__, "_store": None}

    @property
    def store(self) -> SoftTargetStore:
        """The store, opened in this process on first use."""
        if self._store is None:
            store = SoftTargetStore.open(self.path, verify=False)
            if store.header != self._header:
                raise StoreError(
                    f"the soft-target store {str(self.path)!r} changed after this run checked it (another run "
                    "rebuilt it?): its header differs. Restart the run, which checks it again."
                )
            self._store = store
        return self._store

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        batch[FED] = SoftTargets(*gather(self.store, batch, by_view=self.by_view))
        self.seconds += time.perf_counter() - start
        self.batches += 1
        return batch
