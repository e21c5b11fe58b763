"""Planted class hierarchies: a simulated generalist's predictions on classes in groups of uneven sizes.

A test bed for :mod:`kd_lightning.clustering` that needs no training: the classes are split into
groups whose sizes differ (as in real label hierarchies: a few large families, many small ones), the
group ids are scattered over the class ids by a random permutation, and a simulated generalist
predicts each sample's class with a chosen accuracy, its errors mostly inside the true class's
group, its probabilities spread over that group and blurred by noise. A clustering of
:func:`~kd_lightning.clustering.prediction_covariance` of ``probs`` should give back ``group_of``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class PlantedHierarchy:
    """A planted hierarchy and a simulated generalist's predictions on it.

    Attributes:
        probs: ``(N, C)`` fp32 predicted probabilities, rows summing to 1.
        target: ``(N,)`` true class of each sample (``samples_per_class`` of each class).
        group_of: ``(C,)`` planted group id of each class.
        sizes: number of classes in each group (``sizes[k] == (group_of == k).sum()``).
    """

    probs: Tensor
    target: Tensor
    group_of: np.ndarray
    sizes: list[int]

    @property
    def groups(self) -> list[list[int]]:
        """The planted groups as lists of class ids, in group-id order."""
        return [np.flatnonzero(self.group_of == k).tolist() for k in range(len(self.sizes))]

    def accuracy(self) -> float:
        """Top-1 accuracy of the simulated generalist."""
        return float((self.probs.argmax(-1) == self.target).double().mean())


def uneven_group_sizes(
    num_classes: int, num_groups: int, min_size: int, max_size: int, rng: np.random.Generator
) -> list[int]:
    """Sizes of ``num_groups`` groups in ``[min_size, max_size]`` summing to ``num_classes``, uneven.

    When there are at least two groups, one group has exactly ``min_size`` classes and one exactly
    ``max_size`` (so both extremes are always present); the other groups share the remaining classes
    in proportions drawn from a Dirichlet(1/2) distribution (far from equal), one class at a time
    among the groups not yet full.

    Args:
        num_classes: ``C``, the classes to share out.
        num_groups: ``K``, the number of groups.
        min_size: least classes per group, ``>= 1``.
        max_size: most classes per group, ``>= min_size``.
        rng: source of randomness.

    Returns:
        ``K`` sizes, in random order.

    Raises:
        ValueError: a bound or count that cannot hold (the message names the argument).

    Example:
        >>> uneven_group_sizes(10, 3, 2, 5, np.random.default_rng(0))  # one 2, one 5, the rest
        [3, 2, 5]
    """
    if not (isinstance(num_groups, int) and num_groups >= 1):
        raise ValueError(f"`num_groups` must be an integer >= 1, got {num_groups!r}.")
    if not (isinstance(min_size, int) and isinstance(max_size, int) and 1 <= min_size <= max_size):
        raise ValueError(
            f"`min_size`, `max_size` must be integers with 1 <= min_size <= max_size, got {min_size}, {max_size}."
        )
    extremes = [min_size, max_size] if num_groups >= 2 else []
    rest = num_groups - len(extremes)
    left = num_classes - sum(extremes)
    if not (isinstance(num_classes, int) and rest * min_size <= left <= rest * max_size):
        raise ValueError(
            f"`num_classes`={num_classes!r} cannot be shared into {num_groups} groups of {min_size} to "
            f"{max_size} classes with one group of each extreme size."
        )
    sizes = np.full(rest, min_size)
    weights = rng.dirichlet(np.full(rest, 0.5)) if rest else np.zeros(0)
    for _ in range(left - rest * min_size):
        open_ = sizes < max_size
        p = np.where(open_, weights, 0.0)
        # Groups with no weight left can still have room: fall back to an even share of it.
        p = p / p.sum() if p.sum() > 0 else open_ / open_.sum()
        sizes[rng.choice(rest, p=p)] += 1
    out = np.concatenate([np.array(extremes, dtype=int), sizes])
    return rng.permutation(out).astype(int).tolist()


def planted_hierarchy(
    num_classes: int = 100,
    num_groups: int = 12,
    min_size: int = 3,
    max_size: int = 15,
    samples_per_class: int = 50,
    accuracy: float = 0.8,
    within_group: float = 0.8,
    group_logit: float = 2.0,
    noise: float = 1.0,
    margin: float = 2.0,
    seed: int = 0,
) -> PlantedHierarchy:
    """Draw a planted hierarchy and a simulated generalist's predicted probabilities on it.

    Classes are split into groups by :func:`uneven_group_sizes` and the group ids scattered over the
    class ids at random. Each class has ``samples_per_class`` samples, of which exactly
    ``round(accuracy * samples_per_class)`` are predicted right (so the top-1 accuracy is that share,
    exactly). A wrong sample's predicted class is another class of its true group with probability
    ``within_group`` (when the group has one), else a class of another group, uniformly. The logits
    of a sample are Gaussian ``noise`` on every class, plus ``group_logit`` on every class of the
    true class's group (the generalist hesitates within a family); the predicted class's logit is
    then set ``margin`` above the largest other one, so it is the top-1.

    Args:
        num_classes: ``C``.
        num_groups: ``K``.
        min_size: least classes per group.
        max_size: most classes per group.
        samples_per_class: samples of each class (``N = C * samples_per_class``).
        accuracy: top-1 accuracy of the generalist, in ``[0, 1]``.
        within_group: share of the errors that stay within the true class's group, in ``[0, 1]``.
        group_logit: logit added to the true class's group, ``>= 0``.
        noise: standard deviation of the logit noise, ``>= 0``.
        margin: logit margin of the predicted class over the runner-up, ``>= 0``.
        seed: seed of everything drawn.

    Returns:
        The :class:`PlantedHierarchy`.

    Raises:
        ValueError: a parameter outside its range (the message names it), or group bounds that
            cannot hold (see :func:`uneven_group_sizes`).

    Example:
        >>> h = planted_hierarchy(30, 4, 3, 12, samples_per_class=20, accuracy=0.75, seed=1)
        >>> tuple(h.probs.shape), sum(h.sizes), h.accuracy()
        ((600, 30), 30, 0.75)
    """
    for name, value in (("accuracy", accuracy), ("within_group", within_group)):
        if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise ValueError(f"`{name}` must lie in [0, 1], got {value!r}.")
    for name, value in (("group_logit", group_logit), ("noise", noise), ("margin", margin)):
        if not (isinstance(value, (int, float)) and 0.0 <= value < float("inf")):
            raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
    if not (isinstance(samples_per_class, int) and samples_per_class >= 1):
        raise ValueError(f"`samples_per_class` must be an integer >= 1, got {samples_per_class!r}.")
    rng = np.random.default_rng(seed)
    sizes = uneven_group_sizes(num_classes, num_groups, min_size, max_size, rng)
    group_of = rng.permutation(np.repeat(np.arange(num_groups), sizes))
    members = [np.flatnonzero(group_of == k) for k in range(num_groups)]

    target = np.repeat(np.arange(num_classes), samples_per_class)
    n = target.size
    # Exactly round(accuracy * samples_per_class) right predictions per class.
    right = round(accuracy * samples_per_class)
    rank = np.argsort(rng.random((num_classes, samples_per_class)), axis=1)
    correct = (rank < right).reshape(-1)

    predicted = target.copy()
    for i in np.flatnonzero(~correct):
        c = target[i]
        mates = members[group_of[c]]
        mates = mates[mates != c]
        outside = np.flatnonzero(group_of != group_of[c])
        inside = mates.size > 0 and (outside.size == 0 or rng.random() < within_group)
        pool = mates if inside else outside
        if pool.size == 0:  # one class in all: nothing to be wrong about
            raise ValueError(f"`accuracy`={accuracy!r} < 1 needs `num_classes` >= 2, got {num_classes}.")
        predicted[i] = rng.choice(pool)

    logits = noise * rng.standard_normal((n, num_classes))
    logits += group_logit * (group_of[None, :] == group_of[target][:, None])
    rows = np.arange(n)
    logits[rows, predicted] = -np.inf
    logits[rows, predicted] = logits.max(1) + margin
    probs = torch.from_numpy(logits).softmax(-1).float()
    return PlantedHierarchy(probs, torch.from_numpy(target), group_of, sizes)


#: Planted hierarchies of uneven group sizes on which the default grouping is held to an adjusted Rand
#: index >= 0.95 (tests) and every method is reported (``scripts/benchmark_specialists.py --ari-only``):
#: label -> :func:`planted_hierarchy` arguments (its defaults otherwise: 50 samples per class, a generalist
#: 80% accurate, 80% of its errors within the true group).
UNEVEN_SETTINGS: dict[str, dict[str, Any]] = {
    "100 classes, 12 groups of 3-15": dict(num_classes=100, num_groups=12, min_size=3, max_size=15),
    "100 classes, 12 groups of 1-20": dict(num_classes=100, num_groups=12, min_size=1, max_size=20),
    "30 classes, 5 groups of 2-10": dict(num_classes=30, num_groups=5, min_size=2, max_size=10),
    "10 classes, 4 groups of 1-4": dict(num_classes=10, num_groups=4, min_size=1, max_size=4),
    "100 classes, 12 groups of 3-15, 60% accurate, half the errors outside the group": dict(
        num_classes=100,
        num_groups=12,
        min_size=3,
        max_size=15,
        accuracy=0.6,
        within_group=0.5,
        group_logit=0.5,
    ),
}
