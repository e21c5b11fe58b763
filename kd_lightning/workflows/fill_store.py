"""Fill the soft-target stores of a DataModule's splits from a teacher checkpoint, without training.

``kd fill-store`` runs :func:`fill_store`: the stores it writes under ``out_dir`` are the ones the
``SoftTargetCache`` callback would build with ``path: out_dir`` and the same encoding, views and data, so
a later fit with that callback finds them complete and never loads the teacher::

    kd fill-store --teacher_ckpt runs/fashion_mnist/teacher/seed0/checkpoints/final.ckpt \\
        --data kd_lightning.datamodules.IndexedDataModule \\
        --data.source kd_lightning.datamodules.FashionMNIST \\
        --out_dir runs/fashion_mnist/soft_targets --splits '[train, val, test]'

One process; a multi-process build goes through the callback under DDP, or through
:func:`kd_lightning.cache.fill_store` with a :class:`~kd_lightning.cache.Collective`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision

from kd_lightning.cache import (
    SPLITS,
    NamedPrecision,
    StoreIdentity,
    check_datamodule,
    check_store,
    split_dataset,
    teacher_identity,
)
from kd_lightning.cache import fill_store as fill
from kd_lightning.launch import check_precision, resolve_accelerator
from kd_lightning.store import Encoding, StaleStoreError, compare, file_sha256, teacher_fingerprint

#: Lightning's precision plugin for each precision name, given the device type.
_PLUGINS: dict[str, Callable[[str], Any]] = {
    "32-true": lambda device: Precision(),
    "64-true": lambda device: DoublePrecision(),
    "16-true": lambda device: HalfPrecision("16-true"),
    "bf16-true": lambda device: HalfPrecision("bf16-true"),
    "16-mixed": lambda device: MixedPrecision("16-mixed", device),
    "bf16-mixed": lambda device: MixedPrecision("bf16-mixed", device),
}


@dataclass
class FilledStore:
    """One split's store after :func:`fill_store`.

    Attributes:
        split: ``"train"``, ``"val"`` or ``"test"``.
        path: the store's directory (``<out_dir>/<split>``).
        built: whether it was built now (``False``: a complete store of this teacher was there already).
        reason: why it was built (``"does not exist"``, ``"is stale: ..."``), or ``""``.
        samples: rows of the store.
        views: views per row.
        teacher: the teacher's fingerprint.
        seconds: the build's wall-clock seconds (0 when reused).
    """

    split: str
    path: str
    built: bool
    reason: str
    samples: int
    views: int
    teacher: str
    seconds: float


def fill_store(
    teacher_ckpt: str,
    data: L.LightningDataModule,
    out_dir: str,
    splits: Sequence[str] = ("train", "val"),
    kind: Literal["logits", "topk"] = "logits",
    dtype: Literal["float32", "float16", "bfloat16"] = "float16",
    top_k: int | None = None,
    views: int | None = None,
    batch_size: int = 1024,
    accelerator: str = "auto",
    precision: str = "32-true",
    rebuild: bool = True,
) -> list[FilledStore]:
    """Fill the soft-target stores of ``data``'s splits from a teacher checkpoint, one process, no training.

    Each split's store goes to ``<out_dir>/<split>``; a complete store of this teacher, data and encoding
    already there is verified and kept, a missing, stale or corrupt one is built (replaced atomically).

    Args:
        teacher_ckpt: checkpoint of the teacher, written by one of kd-lightning's modules.
        data: the DataModule (``class_path``), e.g. ``kd_lightning.datamodules.IndexedDataModule``; it
            must be a ``kd_lightning.cache.CacheDataModule``. Its own split seed fixes the validation split.
        out_dir: directory of the stores (the callback's ``path``).
        splits: the splits to fill, among ``train``, ``val`` and ``test``.
        kind: ``logits`` (all logits) or ``topk`` (``top_k`` log-probabilities and the residual mass).
        dtype: ``float32``, ``float16`` or ``bfloat16`` on disk.
        top_k: ``k`` for ``kind=topk``.
        views: ``None`` for the un-augmented input once per sample; ``V`` stores views ``0 .. V-1`` of the
            training split's replayable augmentation (the DataModule's ``augment_seed``).
        batch_size: teacher batch size.
        accelerator: ``auto``, ``cpu``, ``cuda``, ``gpu`` or ``mps``; the first device of that type runs
            the teacher.
        precision: Lightning's name of the teacher's precision (``32-true``, ``bf16-mixed``, ``16-mixed``, ...).
        rebuild: build a missing, stale or corrupt store; ``False`` raises instead, touching nothing.

    Returns:
        one :class:`FilledStore` per split.

    Raises:
        ValueError: an unknown split, kind, dtype or precision, ``top_k`` missing or larger than the
            number of classes, ``views`` without replayable augmentation, or ``data`` not a
            CacheDataModule (each names the argument).
        StaleStoreError: a store is missing, stale or corrupt and ``rebuild`` is False.
        StoreError: ``out_dir`` holds something that is not a store of this dataset and split, or cannot
            be written.
    """
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise ValueError(f"`splits` must be a non-empty list of {SPLITS}, got {list(splits)!r}.")
    encoding = Encoding(kind, dtype, top_k)
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    device_type = resolve_accelerator(accelerator)
    name = check_precision(precision, device_type)
    if name not in _PLUGINS:
        raise ValueError(f"`precision` must be one of {list(_PLUGINS)}, got {precision!r}.")
    inference = NamedPrecision(name, _PLUGINS[name](device_type))
    datamodule = check_datamodule(data)
    num_classes = datamodule.num_classes
    if encoding.kind == "topk" and encoding.top_k > num_classes:
        raise ValueError(
            f"`top_k`={encoding.top_k} exceeds the number of classes of the data ({num_classes}): choose "
            f"1 <= top_k <= {num_classes}, or kind='logits'."
        )
    data.prepare_data()
    for stage, needs in (("fit", ("train", "val")), ("test", ("test",))):
        if any(split in needs for split in splits):
            data.setup(stage)

    from kd_lightning.modules import load_teacher  # the modules import Lightning's heavier parts

    loaded = load_teacher(teacher_ckpt)
    # Fingerprinted as loaded, before the precision's conversion: the callback does the same.
    fingerprint, checkpoint_sha = teacher_fingerprint(loaded), file_sha256(teacher_ckpt)
    device = torch.device(device_type)
    teacher = inference.plugin.convert_module(loaded).to(device).eval().requires_grad_(False)
    record = teacher_identity(
        teacher, fingerprint=fingerprint, checkpoint=teacher_ckpt, checkpoint_sha256=checkpoint_sha
    )

    def same_teacher(header: Mapping[str, Any]) -> list[str]:
        return compare(header, {"teacher": {"fingerprint": fingerprint}})

    results = []
    for split in dict.fromkeys(splits):
        path = Path(out_dir) / split
        dataset = split_dataset(datamodule, split)
        identity = StoreIdentity.of(
            dataset,
            datamodule.fingerprint(split),
            num_classes=num_classes,
            encoding=encoding,
            views=views if split == "train" else None,
        )
        check = check_store(path, identity, same_teacher)
        store, seconds = check.store, 0.0
        if store is None:
            if not rebuild:
                raise StaleStoreError(
                    f"the soft-target store {str(path)!r} {check.reason.rstrip('.')}, and `rebuild` is False.",
                    check.differences,
                )
            start = time.perf_counter()
            store = fill(
                teacher,
                dataset,
                path,
                identity,
                teacher_record=record,
                batch_size=batch_size,
                device=device,
                precision=inference,
                log=lambda message: print(message, file=sys.stderr),
            )
            seconds = time.perf_counter() - start
        results.append(
            FilledStore(
                split=split,
                path=str(path),
                built=check.store is None,
                reason=check.reason,
                samples=len(store.indices),
                views=store.num_views,
                teacher=store.header["teacher"]["fingerprint"],
                seconds=round(seconds, 3),
            )
        )
    return results
