"""Serving a store's soft targets to a batch, keyed by its ``index`` (and ``view``).

:func:`soft_targets` is what goes into ``batch["teacher_logits"]``: one gather per array of the store
(:meth:`~kd_lightning.store.SoftTargetStore.lookup`), as fp32 ``(N, C)`` on the requested device. A
store of augmentation views serves each row's own view; views the store lacks are computed by a
fallback (the live teacher), never replaced by another view's targets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from kd_lightning.store import SoftTargetStore


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
    if not isinstance(batch, Mapping) or "index" not in batch:
        keys = list(batch) if isinstance(batch, Mapping) else None
        raise ValueError(
            "soft targets are served to batches that are dicts with an 'index' entry (the batch contract of "
            f"docs/architecture.md); got {type(batch).__name__} with keys {keys}."
        )
    index = batch["index"]
    if not by_view:
        return store.lookup(index).to(device, non_blocking=True), len(index)
    if "view" not in batch:
        raise ValueError(
            f"the store {str(store.path)!r} holds {store.num_views} augmentation view(s) per sample, and the "
            "batches carry no 'view'; the DataModule's augmentation must be replayable (`augment_seed`)."
        )
    view = batch["view"].cpu()
    hit = view < store.num_views
    hits = int(hit.sum())
    if hits == len(view):
        return store.lookup(index, view).to(device, non_blocking=True), hits
    if fallback is None:
        raise ValueError(
            f"views >= {store.num_views} are not in the store {str(store.path)!r}, and no `fallback` computes "
            "them."
        )
    # Hybrid: the views the store lacks are computed live, never replaced by another view's targets.
    out = torch.empty(len(view), store.num_classes, device=device)
    if hits:
        out[hit.to(device)] = store.lookup(index.cpu()[hit], view[hit]).to(device)
    miss = (~hit).to(device)
    out[miss] = fallback(batch["input"][miss])
    return out, hits
