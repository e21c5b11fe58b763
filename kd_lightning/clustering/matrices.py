"""The class-by-class matrices that groups of confused classes are found in (Hinton et al. 2015, section 5).

:func:`prediction_covariance` is the paper's matrix (no labels needed); :func:`confusion_affinity` is a
symmetrised, row-normalised soft confusion matrix (needs labels). :data:`MATRICES` names them for
:class:`~kd_lightning.callbacks.confusion_clustering.ConfusionClustering`'s ``matrix`` argument.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def check_probs(probs: Tensor, name: str = "probs") -> None:
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(
            f"`{name}` must have shape (num_samples, num_classes >= 2), got {tuple(probs.shape)}."
        )


def prediction_covariance(probs: Tensor) -> Tensor:
    """Covariance over samples of the predicted class probabilities: the paper's clustering matrix.

    Entry ``(i, j)`` is positive when classes ``i`` and ``j`` tend to receive probability on the same
    inputs, i.e. when the classifier confuses them; no labels are needed.

    Args:
        probs: ``(N, C)`` predicted probabilities, ``N >= 2``.

    Returns:
        ``(C, C)`` symmetric fp64 tensor, normalised by ``N - 1`` like :func:`numpy.cov`.

    Raises:
        ValueError: ``probs`` is not ``(N >= 2, C >= 2)``.

    Example:
        >>> p = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
        >>> prediction_covariance(p)[0].round(decimals=4).tolist()
        [0.0833, 0.0833, -0.1667]
    """
    check_probs(probs)
    if probs.shape[0] < 2:
        raise ValueError(f"`probs` needs at least 2 samples for a covariance, got {probs.shape[0]}.")
    x = probs.double()
    x = x - x.mean(0, keepdim=True)
    return x.T @ x / (x.shape[0] - 1)


def confusion_affinity(probs: Tensor, target: Tensor) -> Tensor:
    """Symmetrised, row-normalised soft confusion matrix ``(M + M^T) / 2``.

    Row ``c`` of ``M`` is the mean predicted distribution over the samples whose true class is ``c``
    (a soft confusion matrix; pass one-hot ``probs`` for the hard one). Normalising by the class's
    sample count keeps rare classes from looking unconfusable; symmetrising makes "i mistaken for j"
    and "j mistaken for i" one affinity. A class with no sample has a zero row.

    Args:
        probs: ``(N, C)`` predicted probabilities.
        target: ``(N,)`` true class ids in ``[0, C)``.

    Returns:
        ``(C, C)`` symmetric fp64 tensor with entries in ``[0, 1]``.

    Raises:
        ValueError: shapes disagree or a target lies outside ``[0, C)``.

    Example:
        >>> p = torch.tensor([[0.6, 0.4], [0.0, 1.0]])
        >>> confusion_affinity(p, torch.tensor([0, 1])).round(decimals=4).tolist()
        [[0.6, 0.2], [0.2, 1.0]]
    """
    check_probs(probs)
    num_classes = probs.shape[1]
    if target.shape != probs.shape[:1]:
        raise ValueError(
            f"`target` must have shape ({probs.shape[0]},) to match `probs`, got {tuple(target.shape)}."
        )
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"`target` must lie in [0, {num_classes}), got values in [{int(target.min())}, {int(target.max())}]."
        )
    sums = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=probs.device)
    sums.index_add_(0, target.long(), probs.double())
    counts = torch.bincount(target.long(), minlength=num_classes).clamp_min(1).double()
    m = sums / counts[:, None]
    return (m + m.T) / 2


# Name -> matrix builder ``(probs, target) -> (C, C)``; the callback's ``matrix`` argument picks one.
MATRICES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "covariance": lambda probs, target: prediction_covariance(probs),
    "confusion": confusion_affinity,
}


def class_matrix(kind: str, probs: Tensor, target: Tensor) -> Tensor:
    """The ``(C, C)`` matrix named ``kind`` (a key of :data:`MATRICES`) of these predictions.

    Raises:
        ValueError: ``kind`` is not a known name (the message lists them).
    """
    if kind not in MATRICES:
        raise ValueError(f"`matrix` must be one of {sorted(MATRICES)}, got {kind!r}.")
    return MATRICES[kind](probs, target)
