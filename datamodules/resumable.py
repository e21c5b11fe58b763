"""A shuffling training loader whose place in an epoch survives a checkpoint.

Lightning 2.6 saves the ``state_dict()`` of every training loader that has ``state_dict`` and
``load_state_dict`` with the fit loop, and hands it back on a resume from a mid-epoch checkpoint before
the loader's iterator is created. A plain :class:`~torch.utils.data.DataLoader` has neither, so a resumed
epoch starts a fresh permutation and serves again samples the interrupted epoch already trained on
(Lightning warns "your dataloader is not resumable").

:class:`ResumableLoader` draws each epoch's order exactly as :class:`~torch.utils.data.RandomSampler`
does (a seed drawn from torch's global generator when the epoch's first index is needed, then
``randperm``), so training is unchanged; its state is that seed and the number of batches handed out,
and a resumed epoch replays the same permutation from the next batch on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from typing_extensions import override


class ResumableOrder(Sampler[int]):
    """RandomSampler's order (one permutation of ``range(length)`` per epoch) that can restart mid-epoch.

    Example:
        >>> order = ResumableOrder(5)
        >>> first = list(order)
        >>> order.resume(order.seed, 2)
        >>> list(order) == first[2:]
        True
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self.seed: int | None = None
        self._resume: tuple[int, int] | None = None

    def resume(self, seed: int, skip: int) -> None:
        """Make the next epoch the permutation of ``seed`` without its first ``skip`` indices."""
        self._resume = (seed, skip)

    @override
    def __iter__(self) -> Iterator[int]:
        if self._resume is not None:
            (self.seed, skip), self._resume = self._resume, None
        else:
            # RandomSampler's own draw, at the same moment: the first index of the epoch.
            self.seed, skip = int(torch.empty((), dtype=torch.int64).random_().item()), 0
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        yield from torch.randperm(self.length, generator=generator).tolist()[skip:]

    def __len__(self) -> int:
        return self.length


class ResumableLoader(DataLoader):
    """A shuffling :class:`~torch.utils.data.DataLoader` with ``state_dict``/``load_state_dict`` (see the module).

    Args:
        dataset: a sized map-style dataset.
        batch_size: samples per batch.
        **kwargs: further DataLoader arguments (``num_workers``, ``pin_memory``, ...), not ``shuffle``
            or a sampler.
    """

    def __init__(self, dataset: Dataset, batch_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=ResumableOrder(len(dataset)), **kwargs)
        self._served = 0
        self._start = 0

    @override
    def __iter__(self) -> Iterator[Any]:
        self._served, self._start = self._start, 0
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The current epoch's order seed and the number of batches already handed out."""
        return {"seed": self.sampler.seed, "batches": self._served}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next epoch continue the saved one (a finished or never started epoch is not replayed)."""
        if state["seed"] is None or not 0 < state["batches"] < len(self):
            return
        self.sampler.resume(int(state["seed"]), int(state["batches"]) * self.batch_size)
        self._start = int(state["batches"])
