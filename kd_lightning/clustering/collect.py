"""Gathering a split's predictions across processes, one row per sample, to build a class matrix from.

:class:`PredictionCollector` is a torchmetrics metric that gathers ``(index, probs, target)`` and drops
the duplicates a DistributedSampler pads with (:func:`first_per_index`), so the matrix is the same for
any number of processes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from kd_lightning.clustering.matrices import check_probs


class PredictionCollector(Metric):
    """Collects ``(index, probs, target)`` of a split, across processes, one row per sample.

    Under DDP a DistributedSampler pads the last shard with repeats of real samples; they carry the
    same ``index`` (the batch contract), so :meth:`compute` keeps one row per index and the result does
    not depend on the number of processes. Rows come back sorted by index.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, index: Tensor, probs: Tensor, target: Tensor) -> None:
        check_probs(probs)
        self.index.append(index.long())
        self.probs.append(probs.float())
        self.target.append(target.long())

    def compute(self) -> tuple[Tensor, Tensor, Tensor]:
        # After a DDP sync the list states are already concatenated tensors.
        if isinstance(self.index, list) and not self.index:
            raise RuntimeError("PredictionCollector: no predictions were collected.")
        index, probs, target = dim_zero_cat(self.index), dim_zero_cat(self.probs), dim_zero_cat(self.target)
        keep = first_per_index(index)
        return index[keep], probs[keep], target[keep]


def first_per_index(index: Tensor) -> Tensor:
    """Positions of the first occurrence of each distinct ``index``, in increasing order of index.

    Example:
        >>> first_per_index(torch.tensor([5, 2, 5, 2, 7])).tolist()
        [1, 0, 4]
    """
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    first = torch.ones_like(sorted_index, dtype=torch.bool)
    first[1:] = sorted_index[1:] != sorted_index[:-1]
    return order[first]
