"""A shuffling training loader whose place in an epoch survives a checkpoint.

Lightning 2.6 saves the ``state_dict()`` of every training loader that has ``state_dict`` and
``load_state_dict`` with the fit loop, and hands it back on a resume from a mid-epoch checkpoint before
the epoch's first batch is drawn. A plain :class:`~torch.utils.data.DataLoader` has neither, so a resumed
epoch starts a fresh permutation and serves again samples the interrupted epoch already trained on
(Lightning warns "your dataloader is not resumable").

:class:`ResumableLoader` draws each epoch's order exactly as :class:`~torch.utils.data.RandomSampler`
does (a seed drawn from torch's global generator when the epoch's first index is needed, then
``randperm``), so training is unchanged; its state is that seed and the number of batches handed out,
and a resumed epoch replays the same permutation from the next batch on. Under DDP Lightning gives it a
:class:`~torch.utils.data.distributed.DistributedSampler` (the order of an epoch is then fixed by the
sampler's seed and the epoch, on every start), and a resumed epoch skips the batches already served.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler
from typing_extensions import override


class ResumableOrder(RandomSampler):
    """RandomSampler's order (one permutation of ``range(length)`` per epoch), or ``base``'s, that can restart
    mid-epoch. A RandomSampler to Lightning, which therefore shards it under DDP as it shards a shuffled loader.

    Args:
        length: number of samples.
        base: the sampler whose order to follow instead (Lightning's DistributedSampler under DDP).

    Example:
        >>> order = ResumableOrder(5)
        >>> first = list(order)
        >>> order.resume(order.seed, 2)
        >>> list(order) == first[2:]
        True
    """

    def __init__(self, length: int, base: Sampler[int] | None = None) -> None:
        super().__init__(range(length))
        self.length = length
        self.base = base
        self.seed: int | None = None
        self._resume: tuple[int | None, int] | None = None

    def resume(self, seed: int | None, skip: int) -> None:
        """Make the next epoch the permutation of ``seed`` (or ``base``'s order) without its first ``skip``
        indices."""
        self._resume = (seed, skip)

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch: handed on to a DistributedSampler ``base``, which orders each
        epoch by its seed and the epoch."""
        if isinstance(self.base, DistributedSampler):
            self.base.set_epoch(epoch)

    @override
    def __iter__(self) -> Iterator[int]:
        if self._resume is not None:
            (seed, skip), self._resume = self._resume, None
        else:
            seed, skip = None, 0
        if self.base is not None:
            yield from list(self.base)[skip:]
            return
        # RandomSampler's own draw, at the same moment: the first index of the epoch.
        self.seed = int(torch.empty((), dtype=torch.int64).random_().item()) if seed is None else seed
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        yield from torch.randperm(self.length, generator=generator).tolist()[skip:]

    @override
    def __len__(self) -> int:
        return self.length if self.base is None else len(self.base)


class ResumableLoader(DataLoader):
    """A shuffling :class:`~torch.utils.data.DataLoader` with ``state_dict``/``load_state_dict`` (see the module).

    Args:
        dataset: a sized map-style dataset.
        batch_size: samples per batch.
        shuffle: must be true (it is recorded for Lightning, which decides from it how to shard under DDP).
        sampler: a sampler whose order to follow (Lightning's DistributedSampler under DDP); default: a new
            permutation every epoch.
        **kwargs: further DataLoader arguments (``num_workers``, ``pin_memory``, ...).

    Raises:
        ValueError: ``shuffle`` is false without a ``sampler``.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        shuffle: bool = True,
        sampler: Sampler[int] | None = None,
        **kwargs: Any,
    ) -> None:
        if sampler is None and not shuffle:
            raise ValueError(
                "`shuffle`: a ResumableLoader shuffles; use a DataLoader for a fixed order, got False."
            )
        order = ResumableOrder(len(dataset), base=sampler)
        super().__init__(dataset, batch_size=batch_size, sampler=order, **kwargs)
        self._served = 0
        self._start = 0

    @override
    def __iter__(self) -> Iterator[Any]:
        # Eager, as DataLoader's own: the iterator (and its draw of a worker base seed from torch's global
        # generator) is made now, where Lightning asks for it, not at the first batch.
        return _Counted(self, super().__iter__())

    def state_dict(self) -> dict[str, Any]:
        """The current epoch's order seed and the number of batches already handed out."""
        return {"seed": self.sampler.seed, "batches": self._served}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next epoch continue the saved one (a finished or never started epoch is not replayed)."""
        if not 0 < int(state["batches"]) < len(self):
            return
        self.sampler.resume(state["seed"], int(state["batches"]) * self.batch_size)
        self._start = int(state["batches"])


class _Counted(Iterator[Any]):
    """The batches of ``loader``'s iterator, counted in ``loader._served`` (from the resumed count on)."""

    def __init__(self, loader: ResumableLoader, batches: Iterator[Any]) -> None:
        self.loader = loader
        self.batches = batches
        self.started = False

    def __next__(self) -> Any:
        if not self.started:
            # At the first batch, not at creation: Lightning may hand the loader its saved state after it
            # made the iterator, never after the first batch.
            self.started = True
            self.loader._served, self.loader._start = self.loader._start, 0
        batch = next(self.batches)
        self.loader._served += 1
        return batch
