"""The groups file: which classes each specialist gets, as JSON (the contract of docs/architecture.md).

:class:`ClassGroups` is written by :class:`~kd_lightning.callbacks.confusion_clustering.ConfusionClustering`
and read by the specialists; it is validated on read and on write, and saved atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

GROUPS_FORMAT_VERSION = 1


@dataclass
class ClassGroups:
    """Groups of classes, one specialist per group: the JSON groups file of docs/architecture.md.

    Args:
        num_classes: size of the full label space.
        class_names: one name per class.
        groups: lists of class ids; each non-empty, without repeats, distinct from every other group.
            Classes in no group are left to the generalist.
        method: how the groups were found (matrix, clustering, ``K``, bounds, ...).
        source: what they were found from (checkpoint, data fingerprint, epoch, ...).
        matrix: the ``(C, C)`` matrix that was clustered, or ``None``.

    Raises:
        ValueError: on any inconsistency (see :meth:`validate`).
    """

    num_classes: int
    class_names: list[str]
    groups: list[list[int]]
    method: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    matrix: list[list[float]] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "groups") -> None:
        """Check the file's consistency; every message names the field and what was given.

        Raises:
            ValueError: ``num_classes`` < 2; ``class_names`` of another length; no group; an empty
                group; a class repeated in a group; two identical groups; a class id outside
                ``[0, num_classes)``; a matrix of another shape.
        """
        c = self.num_classes
        if not (isinstance(c, int) and c >= 2):
            raise ValueError(f"{where}: `num_classes` must be an integer >= 2, got {c!r}.")
        if len(self.class_names) != c:
            raise ValueError(f"{where}: `class_names` has {len(self.class_names)} names for num_classes={c}.")
        if not self.groups:
            raise ValueError(f"{where}: `groups` is empty; expected at least one group of class ids.")
        seen: dict[tuple[int, ...], int] = {}
        for g, members in enumerate(self.groups):
            if len(members) == 0:
                raise ValueError(f"{where}: group {g} is empty; every group needs at least one class.")
            bad = [x for x in members if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < c]
            if bad:
                raise ValueError(f"{where}: group {g} has class ids outside the label space [0, {c}): {bad}.")
            if len(set(members)) != len(members):
                raise ValueError(f"{where}: group {g} repeats a class: {list(members)}.")
            key = tuple(sorted(members))
            if key in seen:
                raise ValueError(f"{where}: groups {seen[key]} and {g} are duplicates: {list(key)}.")
            seen[key] = g
        if self.matrix is not None and np.shape(self.matrix) != (c, c):
            raise ValueError(f"{where}: `matrix` must be ({c}, {c}), got shape {np.shape(self.matrix)}.")

    def group(self, g: int) -> list[int]:
        """Class ids of group ``g``.

        Raises:
            ValueError: ``g`` is not a group id of this file.
        """
        if not (isinstance(g, int) and 0 <= g < len(self.groups)):
            raise ValueError(f"`group` must be in [0, {len(self.groups)}) for this groups file, got {g!r}.")
        return list(self.groups[g])

    def membership(self) -> Tensor:
        """``(K, C)`` bool tensor: ``[k, c]`` when class ``c`` is in group ``k``."""
        out = torch.zeros(len(self.groups), self.num_classes, dtype=torch.bool)
        for k, members in enumerate(self.groups):
            out[k, list(members)] = True
        return out

    def named_groups(self) -> list[list[str]]:
        """Each group as class names."""
        return [[self.class_names[c] for c in g] for g in self.groups]

    def save(self, path: str | Path) -> Path:
        """Write the file atomically (beside, then rename), so a crash never leaves half a file."""
        self.validate()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"format_version": GROUPS_FORMAT_VERSION, **asdict(self)}, indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, num_classes: int | None = None) -> ClassGroups:
        """Read and validate a groups file; with ``num_classes``, also check it is for that label space.

        Raises:
            FileNotFoundError: no file at ``path`` (the message names ``groups_file``).
            ValueError: unreadable, inconsistent, or written for another number of classes.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"`groups_file`: no groups file at {str(path)!r}.")
        try:
            raw = json.loads(path.read_text())
            raw.pop("format_version", None)
            groups = cls(**raw)
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"`groups_file` {str(path)!r} is not a groups file: {err}") from err
        except ValueError as err:
            raise ValueError(f"`groups_file` {str(path)!r}: {err}") from err
        if num_classes is not None and groups.num_classes != num_classes:
            raise ValueError(
                f"`groups_file` {str(path)!r} is for {groups.num_classes} classes, but the data/model has "
                f"num_classes={num_classes}."
            )
        return groups
