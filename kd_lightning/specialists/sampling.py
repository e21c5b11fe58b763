"""A specialist's group on the data side: which classes, how they are sampled, how labels map onto it.

The data owns a specialist's classes: :func:`resolve_group` reads them from a groups file (or takes
them as given) for the DataModule, which relabels every batch with :func:`relabel_map` and reports how
it sampled the group (:class:`GroupSampling`); the specialist module reads both through the
:class:`SpecialistData` protocol and turns the sampling into its dustbin correction
(:func:`dustbin_correction`). Pure functions and small types only: ``kd_lightning.datamodules`` imports
this module, not the Lightning modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from kd_lightning.clustering import ClassGroups


def oversampling_factor(data_fraction: float, batch_fraction: float) -> float:
    """How much more likely the group is, against the rest, in the training batches than in the data.

    The ratio of the group's odds: ``(r / (1 - r)) / (f / (1 - f))`` for a group that makes up a
    fraction ``f`` of the data and ``r`` of the batches.

    Args:
        data_fraction: ``f``, the group's share of the training data, in ``(0, 1)``.
        batch_fraction: ``r``, the group's share of the training batches, in ``(0, 1)``.

    Raises:
        ValueError: a fraction outside ``(0, 1)`` (the message names it).

    Example:
        >>> oversampling_factor(0.1, 0.5)
        9.0
    """
    for name, value in (("data_fraction", data_fraction), ("batch_fraction", batch_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"`{name}` must lie in (0, 1), got {value!r}.")
    return (batch_fraction / (1 - batch_fraction)) / (data_fraction / (1 - data_fraction))


def dustbin_correction(data_fraction: float, batch_fraction: float) -> float:
    """What to add to a specialist's dustbin logit after training on oversampled batches.

    A classifier trained where class ``y`` has prior ``pi_train(y)`` estimates
    ``p(y|x) * pi_train(y) / pi(y)`` up to normalisation; dividing the prior ratio back out turns it
    into the posterior under the data's prior ``pi``. For a specialist the ratio is the same for all
    its group's classes (``r / f``) and ``(1 - r) / (1 - f)`` for the dustbin, so, up to a constant
    that softmax ignores, the correction is ``log`` of :func:`oversampling_factor` added to the dustbin
    logit. The paper says "incremented by the log of the proportion by which the specialist class is
    oversampled"; this is that proportion measured on the odds, which is exact (``log(r / f)`` alone
    forgets that the dustbin was undersampled at the same time).

    Example:
        >>> round(dustbin_correction(0.1, 0.5), 4) == round(math.log(9.0), 4)
        True
        >>> dustbin_correction(0.3, 0.3)
        0.0
    """
    return math.log(oversampling_factor(data_fraction, batch_fraction))


def relabel_map(classes: Sequence[int], num_classes: int) -> Tensor:
    """``(C,)`` map from a full-space label to a specialist label: position in ``classes``, else the
    dustbin ``len(classes)``.

    Example:
        >>> relabel_map([3, 1], 5).tolist()
        [2, 1, 2, 0, 2]
    """
    out = torch.full((num_classes,), len(classes), dtype=torch.long)
    out[torch.as_tensor(list(classes), dtype=torch.long)] = torch.arange(len(classes))
    return out


def check_classes(classes: Sequence[int], num_classes: int) -> None:
    """A specialist's group: non-empty, no repeats, inside ``[0, num_classes)``, not every class.

    Raises:
        ValueError: the group breaks one of these rules (the message names ``classes``).

    Example:
        >>> check_classes([1, 3], 5)
        >>> check_classes([1, 5], 5)
        Traceback (most recent call last):
        ...
        ValueError: `classes` has ids outside the label space [0, 5): [5].
    """
    if len(classes) == 0:
        raise ValueError("`classes` is empty: a specialist needs at least one class of its own.")
    bad = [c for c in classes if not isinstance(c, int) or not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"`classes` has ids outside the label space [0, {num_classes}): {bad}.")
    if len(set(classes)) != len(classes):
        raise ValueError(f"`classes` repeats a class: {list(classes)}.")
    if len(classes) >= num_classes:
        raise ValueError(
            f"the group covers all {num_classes} classes: a specialist needs at least one class outside "
            "its group for the dustbin."
        )


def resolve_group(
    num_classes: int,
    groups_file: str | None = None,
    group: int = 0,
    classes: Sequence[int] | None = None,
) -> list[int]:
    """A specialist's classes, given once: group ``group`` of ``groups_file``, or ``classes`` directly.

    Args:
        num_classes: the data's label space (the groups file must be for it).
        groups_file: a groups file (docs/architecture.md), exclusive with ``classes``.
        group: which group of ``groups_file``.
        classes: the group's class ids, exclusive with ``groups_file``.

    Raises:
        ValueError: both or neither of ``groups_file`` and ``classes``; the file is for another number of
            classes or is malformed; ``group`` is out of range; the classes break :func:`check_classes`.
        FileNotFoundError: ``groups_file`` does not exist.

    Example:
        >>> resolve_group(5, classes=[3, 1])
        [3, 1]
    """
    if (groups_file is None) == (classes is None):
        raise ValueError(
            "give the specialist's classes once: either `groups_file` (with `group`) or `classes`, "
            f"got groups_file={groups_file!r} and classes={classes!r}."
        )
    if groups_file is not None:
        classes = ClassGroups.load(groups_file, num_classes).group(group)
    assert classes is not None
    check_classes(classes, num_classes)
    return [int(c) for c in classes]


@dataclass(frozen=True)
class GroupSampling:
    """How a DataModule samples a specialist's group: which classes, their share of the data and of
    the training batches. :class:`SpecialistData` exposes it as ``group_sampling``; the specialist
    module turns it into the dustbin correction.

    Example:
        >>> round(GroupSampling((0,), 0.1, 0.5).correction, 4)
        2.1972
    """

    classes: tuple[int, ...]
    data_fraction: float
    batch_fraction: float

    @property
    def correction(self) -> float:
        return dustbin_correction(self.data_fraction, self.batch_fraction)


@runtime_checkable
class SpecialistData(Protocol):
    """What a specialist module needs from its DataModule (``kd_lightning.datamodules.SpecialistDataModule``
    has it): the group it relabels every batch by (``batch["specialist_target"]``), and how it sampled
    that group for training (``None``: naturally, or not set up for training yet)."""

    @property
    def group_classes(self) -> list[int]: ...

    @property
    def group_sampling(self) -> GroupSampling | None: ...
