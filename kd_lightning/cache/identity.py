"""What a soft-target store was built from, and whether an existing store is the one a run needs.

:class:`StoreIdentity` describes a store apart from its teacher: the dataset (its fingerprint, the
indices of its rows, a hash of a sample of un-augmented inputs), what the teacher saw (the un-augmented
input, or replayed augmentation views), the number of classes and views, and the encoding.
:func:`teacher_identity` adds the teacher. :func:`check_store` compares both with the header of a
store on disk and verifies its bytes; a missing, stale, incomplete or corrupt store is reported (the
caller decides whether to rebuild), a store of another dataset or split, or a directory that is not a
store, is refused outright.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from kd_lightning.cache.protocols import CacheableDataset, ReplayableDataset
from kd_lightning.store import (
    CorruptStoreError,
    Encoding,
    SoftTargetStore,
    StaleStoreError,
    StoreError,
    array_sha256,
    compare,
    describe,
    file_sha256,
    read_header,
    teacher_fingerprint,
)

# Un-augmented inputs hashed into a dataset's identity: catches changed files or normalisation that
# leave the targets alone, for a few reads.
SAMPLED_INPUTS = 64


@dataclass(frozen=True)
class StoreIdentity:
    """What a store of one split is built from, the teacher apart (see :meth:`of`).

    Attributes:
        dataset: the header's ``dataset`` entry: the DataModule's fingerprint of the split, plus hashes of
            the rows' indices and of a sample of un-augmented inputs.
        transform: the header's ``transform`` entry: what the teacher saw.
        num_classes: the number of classes of the soft targets.
        encoding: how the soft targets are written.
        views: ``None`` if the teacher saw each sample once, un-augmented (fixed mode), else the number of
            replayed augmentation views stored per sample.
    """

    dataset: dict[str, Any]
    transform: dict[str, Any]
    num_classes: int
    encoding: Encoding = field(default_factory=Encoding)
    views: int | None = None

    @classmethod
    def of(
        cls,
        dataset: CacheableDataset,
        fingerprint: Mapping[str, Any],
        *,
        num_classes: int,
        encoding: Encoding,
        views: int | None = None,
    ) -> StoreIdentity:
        """The identity of a store of ``dataset``, whose DataModule fingerprints it as ``fingerprint``.

        Args:
            dataset: the split's rows.
            fingerprint: the DataModule's ``fingerprint(split)`` (dataset name, split, length, targets).
            num_classes: classes of the soft targets.
            encoding: how they are written.
            views: ``None`` for the un-augmented input once per sample; ``V >= 1`` for views
                ``0 .. V-1`` of replayable augmentation (``dataset`` must be a replayable
                :class:`ReplayableDataset`).

        Raises:
            ValueError: ``views`` is not ``None`` or a positive integer, or it is given for a dataset
                whose augmentation is not replayable.
        """
        if views is not None and not (isinstance(views, int) and views >= 1):
            raise ValueError(f"`views` must be None (fixed mode) or a positive integer, got {views!r}.")
        length = len(dataset.indices)
        picks = np.unique(np.linspace(0, length - 1, min(length, SAMPLED_INPUTS)).round())
        sample = [dataset.input_of(int(dataset.indices[int(i)])).detach().cpu().numpy() for i in picks]
        data = {
            **fingerprint,
            "indices": array_sha256(dataset.indices),
            "inputs": array_sha256(np.concatenate([s.ravel() for s in sample])) if sample else None,
        }
        if views is None:
            transform: dict[str, Any] = {"teacher_input": "un-augmented"}
        else:
            replayable = check_replayable(dataset, views)
            transform = {
                "teacher_input": "augmented",
                "augmentation": describe(replayable.transform),
                "augment_seed": replayable.augment_seed,
            }
        return cls(data, transform, int(num_classes), encoding, views)

    @property
    def num_views(self) -> int:
        """Views stored per sample: 1 in fixed mode."""
        return 1 if self.views is None else self.views

    def header(self) -> dict[str, Any]:
        """The header entries this identity fixes (everything but ``teacher``, the arrays and ``build``)."""
        return {
            "dataset": self.dataset,
            "transform": self.transform,
            "num_classes": self.num_classes,
            "num_views": self.num_views,
            "encoding": self.encoding.describe(),
        }


def check_replayable(dataset: CacheableDataset, views: int) -> ReplayableDataset:
    """``dataset`` as a replayable :class:`ReplayableDataset`, or a ValueError saying how to make it one."""
    if not (isinstance(dataset, ReplayableDataset) and dataset.replayable):
        raise ValueError(
            f"`views`={views} is augmentation-consistent: the teacher's outputs are stored per augmentation "
            "view, which needs replayable augmentation. Set the DataModule's `augment_seed` (and "
            f"`augment_views`), or use `views: null` (fixed mode); got a {type(dataset).__name__} that is "
            "not replayable."
        )
    return dataset


def teacher_identity(
    teacher: nn.Module,
    *,
    fingerprint: str | None = None,
    checkpoint: str | None = None,
    checkpoint_sha256: str | None = None,
) -> dict[str, Any]:
    """The header's ``teacher`` entry.

    Args:
        teacher: the network whose outputs the store holds.
        fingerprint: its :func:`~kd_lightning.store.teacher_fingerprint` as loaded, before a precision
            conversion; default: computed from ``teacher``.
        checkpoint: the checkpoint file it was loaded from, if any.
        checkpoint_sha256: that file's SHA-256; default: computed when ``checkpoint`` is given.

    Example:
        >>> entry = teacher_identity(nn.Linear(2, 3))
        >>> entry["architecture"], entry["checkpoint"], entry["fingerprint"].startswith("sha256:")
        ('Linear', None, True)
    """
    if checkpoint is not None and checkpoint_sha256 is None:
        checkpoint_sha256 = file_sha256(checkpoint)
    return {
        "fingerprint": fingerprint if fingerprint is not None else teacher_fingerprint(teacher),
        "architecture": type(teacher).__qualname__,
        "checkpoint": checkpoint,
        "checkpoint_sha256": checkpoint_sha256,
    }


@dataclass(frozen=True)
class StoreCheck:
    """What :func:`check_store` found.

    Attributes:
        store: the opened and verified store, or ``None`` when it cannot serve.
        reason: why not (e.g. ``"does not exist"``, ``"is stale: ..."``); empty when it can.
        differences: the fields that differ from what is needed (or the corruption found).
    """

    store: SoftTargetStore | None
    reason: str = ""
    differences: list[str] = field(default_factory=list)


def check_store(
    path: str | Path,
    identity: StoreIdentity,
    teacher_differences: Callable[[Mapping[str, Any]], list[str]],
) -> StoreCheck:
    """Open the store at ``path`` if it is the one ``identity`` and the teacher describe, verifying it.

    Args:
        path: the store's directory.
        identity: what it must be built from, the teacher apart.
        teacher_differences: given the store's header, how its teacher differs from the current one (for
            instance ``compare(header, {"teacher": teacher_identity(...)})``, or ``[]`` where an unchanged
            checkpoint file or the lack of any teacher leaves nothing to check).

    Returns:
        the store, verified (checksums and finiteness), or why it cannot serve: missing, stale,
        incomplete, corrupt.

    Raises:
        StoreError: ``path`` is not a soft-target store, or a store of another dataset or split: never to
            be built over (most likely a wrong ``path``).
    """
    path = Path(path)
    try:
        header = read_header(path)
    except FileNotFoundError:
        return StoreCheck(None, "does not exist")
    except StaleStoreError as err:
        return StoreCheck(None, f"is stale: {err}", err.differences)
    except StoreError as err:
        # Not ours: never built over, whatever `rebuild` says.
        raise StoreError(f"`path`: {err} Choose another `path`.") from err
    if header.get("complete") is not True:
        found = header.get("complete", "<missing>")
        return StoreCheck(
            None,
            "is incomplete (its build did not finish)",
            [f"complete: store has {found!r}, a finished build has True"],
        )
    # Another dataset or split is most likely a wrong `path`: never built over, whatever `rebuild` says.
    # (Changed targets, length or inputs of the same dataset make a store stale, not foreign.)
    owner = compare(header, {"dataset": {k: identity.dataset[k] for k in ("dataset", "split")}})
    if owner:
        raise StoreError(
            f"`path`: the soft-target store {str(path)!r} belongs to another dataset or split "
            f"({'; '.join(owner)}); it is left as it is. Choose another `path`, or delete the store."
        )
    differences = compare(header, identity.header()) + teacher_differences(header)
    if differences:
        return StoreCheck(None, "is stale: " + "; ".join(differences), differences)
    try:
        return StoreCheck(SoftTargetStore.open(path, verify=True))
    except CorruptStoreError as err:
        return StoreCheck(None, f"is corrupt: {err}", [str(err)])
    except StoreError as err:
        return StoreCheck(None, f"cannot be used: {err}", [str(err)])
