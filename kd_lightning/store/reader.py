"""Reading: :class:`SoftTargetStore`, a complete store opened read-only, verified, looked up by sample index."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kd_lightning.store.format import INDEX, Encoding, StoreError, read_header, topk_log_probs
from kd_lightning.store.verify import _scan_store


class SoftTargetStore:
    """A complete store opened read-only: ``lookup(index, view)`` returns the teacher's logits.

    Open one with :meth:`open`; it memory-maps the arrays (nothing is read until asked for).

    Attributes:
        path: the store's directory.
        header: its parsed ``header.json``.
        encoding: how its soft targets are encoded.
        num_classes: ``C``.
        num_views: ``V``.
        indices: the sample index of each row, ``(L,)`` int64.
    """

    def __init__(self, path: Path, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.path = path
        self.header = header
        self.encoding = Encoding(**{k: header["encoding"][k] for k in ("kind", "dtype", "top_k")})
        self.num_classes = int(header["num_classes"])
        self.num_views = int(header["num_views"])
        self._arrays = arrays
        self.indices = np.asarray(arrays[INDEX])
        # Dense inverse map sample index -> row (-1: not stored): one gather per lookup.
        size = int(self.indices.max()) + 1 if len(self.indices) else 0
        self._row_of = np.full(size, -1, dtype=np.int64)
        self._row_of[self.indices] = np.arange(len(self.indices))

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        e = self.encoding
        fmt = e.kind if e.kind == "logits" else f"top-{e.top_k}"
        return f"SoftTargetStore({str(self.path)!r}, {fmt} {e.dtype}, {len(self)} samples x {self.num_views} views)"

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> SoftTargetStore:
        """Open the complete store at ``path``, by default verifying its content first (:meth:`verify`).

        Args:
            path: the store's directory.
            verify: read the whole store once to check its checksums and values; ``False`` only where
                the bytes were just checked (the store a commit has just published).

        Raises:
            FileNotFoundError: no directory at ``path``.
            StoreError: no or unreadable header, another format or version, an incomplete build, or an
                array file missing or of the wrong size (truncated); the message names the path.
            CorruptStoreError: (``verify``) an array's checksum differs from the header, or it holds a
                non-finite soft target (the message names the array and the first bad row).
        """
        path = Path(path)
        header = read_header(path)
        if header.get("complete") is not True:
            raise StoreError(
                f"soft-target store {str(path)!r} is incomplete: its build did not finish (header has "
                f"complete={header.get('complete')!r}); it is never used. Rebuild it."
            )
        arrays = {}
        for name, spec in header["arrays"].items():
            dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
            file = path / name
            expected = math.prod(shape) * dtype.itemsize
            size = file.stat().st_size if file.is_file() else None
            if size != expected:
                found = "missing" if size is None else f"{size} bytes"
                raise StoreError(
                    f"soft-target store {str(path)!r}: array file {name!r} is {found}, expected {expected} "
                    f"bytes (shape {list(shape)}, dtype {dtype.str}); the file is truncated or corrupt. Rebuild the store."
                )
            # An empty file cannot be memory-mapped; an empty array needs no file contents.
            arrays[name] = np.memmap(file, dtype, "r", shape=shape) if expected else np.zeros(shape, dtype)
        store = cls(path, header, arrays)
        if verify:
            store.verify()
        return store

    def verify(self) -> None:
        """Read every array once: its SHA-256 must be the header's and every soft target finite.

        ``log_residual`` may be ``-inf`` when ``k == C`` (what :func:`topk_encode` writes then).

        Raises:
            CorruptStoreError: an array's bytes changed since the store was written, or it holds a
                non-finite soft target; the message names the store, the array and the first bad row
                (view, row and sample index).
        """
        _scan_store(self.path, self.header, self.indices, check_sums=True)

    def rows(self, index: Tensor | np.ndarray) -> np.ndarray:
        """Rows of the sample indices ``index``.

        Raises:
            IndexError: an index is not in the store; the message names the store and the indices.
        """
        index = np.asarray(index.cpu() if isinstance(index, Tensor) else index, dtype=np.int64)
        inside = (index >= 0) & (index < len(self._row_of))
        rows = np.full(index.shape, -1, dtype=np.int64)
        rows[inside] = self._row_of[index[inside]]
        if (rows < 0).any():
            missing = index[rows < 0]
            data = self.header.get("dataset", {})
            raise IndexError(
                f"soft-target store {str(self.path)!r}: sample index {_few(missing)} is not in the store, which "
                f"holds {len(self)} samples of split {data.get('split')!r} of dataset {data.get('dataset')!r} "
                f"(indices {int(self.indices.min()) if len(self) else None}..{int(self.indices.max()) if len(self) else None}, "
                "not necessarily contiguous)."
            )
        return rows

    def lookup(self, index: Tensor | np.ndarray, view: Tensor | np.ndarray | None = None) -> Tensor:
        """The teacher's logits for sample indices ``index`` (and augmentation ``view``): ``(N, C)`` fp32.

        For a top-k store these are the log-probabilities of :func:`topk_log_probs`, whose softmax at
        ``T = 1`` is the stored distribution.

        Args:
            index: ``(N,)`` sample indices (positions in the source split).
            view: ``(N,)`` views, each in ``[0, num_views)``; may be ``None`` for a one-view store.

        Raises:
            IndexError: an index or view is not in the store (the message names the store).
        """
        rows = self.rows(index)
        if view is None:
            if self.num_views != 1:
                raise IndexError(
                    f"soft-target store {str(self.path)!r} holds {self.num_views} views per sample: "
                    "pass `view` (batch['view'] from replayable augmentation)."
                )
            views = np.zeros_like(rows)
        else:
            views = np.asarray(view.cpu() if isinstance(view, Tensor) else view, dtype=np.int64)
            bad = (views < 0) | (views >= self.num_views)
            if bad.any():
                raise IndexError(
                    f"soft-target store {str(self.path)!r}: view {_few(views[bad])} is not in the store, which "
                    f"holds views 0..{self.num_views - 1} of each sample."
                )
        if self.encoding.kind == "logits":
            return self._decode(self._arrays["logits.bin"][views, rows])
        values = self._decode(self._arrays["values.bin"][views, rows])
        classes = torch.from_numpy(self._arrays["classes.bin"][views, rows].astype(np.int64))
        log_residual = self._decode(self._arrays["log_residual.bin"][views, rows])
        return topk_log_probs(values, classes, log_residual, self.num_classes)

    def _decode(self, array: np.ndarray) -> Tensor:
        if self.encoding.dtype == "bfloat16":
            return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16).float()
        return torch.from_numpy(np.ascontiguousarray(array)).float()


def _few(values: np.ndarray, n: int = 5) -> str:
    shown = ", ".join(str(int(v)) for v in values[:n])
    return (
        f"[{shown}{', ...' if len(values) > n else ''}] ({len(values)} in all)" if len(values) > 1 else shown
    )
