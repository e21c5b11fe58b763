"""Writing: :class:`StoreWriter` fills a temporary directory beside the store and publishes it atomically."""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kd_lightning.store.files import (
    _fsync_dir,
    _raw_header,
    _remove_own,
    _write_json,
    check_replaceable,
    new_token,
    remove_leftovers,
    temp_path,
)
from kd_lightning.store.format import (
    _NUMPY,
    _TORCH,
    FORMAT,
    HEADER,
    INDEX,
    LOG_PROB_FLOOR,
    VERSION,
    Encoding,
    StaleStoreError,
    StoreError,
    read_header,
    topk_encode,
)
from kd_lightning.store.reader import SoftTargetStore
from kd_lightning.store.verify import _scan_store


class StoreWriter:
    """Write one store into a temporary directory beside its final path; :meth:`commit` publishes it.

    Several processes can fill one store: one calls :meth:`create`, the others :meth:`attach` to the
    same temporary directory, each writes its own rows with :meth:`write` and calls :meth:`close`,
    then one calls :meth:`commit`.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> w = StoreWriter.create(root / "train", Encoding("logits", "float32"), num_classes=3,
        ...                        indices=np.array([4, 9]), num_views=1, identity={}, token="t0")
        >>> w.write(0, 0, torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]))
        >>> w.commit().lookup(torch.tensor([9])).tolist()
        [[0.0, 0.0, 1.0]]
        >>> import shutil; shutil.rmtree(root)
    """

    def __init__(self, path: Path, tmp: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.tmp = tmp
        self.header = header
        self.encoding = Encoding(**{k: header["encoding"][k] for k in ("kind", "dtype", "top_k")})
        self.num_classes = int(header["num_classes"])
        self.indices = np.fromfile(tmp / INDEX, dtype="<i8")
        #: Leftovers of interrupted builds that :meth:`create` removed (see :func:`remove_leftovers`).
        self.removed_leftovers: list[Path] = []
        self._arrays = {
            name: np.memmap(tmp / name, np.dtype(spec["dtype"]), "r+", shape=tuple(spec["shape"]))
            for name, spec in header["arrays"].items()
            if name != INDEX and math.prod(spec["shape"])
        }

    @classmethod
    def create(
        cls,
        path: str | Path,
        encoding: Encoding,
        num_classes: int,
        indices: np.ndarray | Tensor,
        num_views: int,
        identity: Mapping[str, Any],
        token: str | None = None,
    ) -> StoreWriter:
        """Allocate an empty store for ``indices`` (one row each) and ``num_views`` views.

        Args:
            path: final directory of the store (not touched until :meth:`commit`).
            encoding: how to encode the soft targets.
            num_classes: ``C``.
            indices: sample index of each row, distinct.
            num_views: ``V >= 1``.
            identity: header fields the store is recognised by (teacher, dataset, transform ...).
            token: build token shared by the processes of one build (default: a fresh one).

        Leftovers of interrupted builds of the same store are removed first (:func:`remove_leftovers`;
        listed in :attr:`removed_leftovers`).

        Raises:
            ValueError: ``top_k > num_classes``, repeated or negative indices, or ``num_views < 1``.
        """
        path = Path(path)
        indices = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices, dtype="<i8")
        if len(np.unique(indices)) != len(indices) or (indices < 0).any():
            raise ValueError(f"soft-target store {str(path)!r}: `indices` must be distinct and non-negative.")
        if not (isinstance(num_views, int) and num_views >= 1):
            raise ValueError(f"`num_views` must be a positive integer, got {num_views!r}.")
        layout = encoding.arrays(num_views, len(indices), num_classes)
        token = token or new_token()
        removed = remove_leftovers(path, keep=token)
        tmp = temp_path(path, token)
        tmp.mkdir(parents=True)
        arrays = {INDEX: {"dtype": indices.dtype.str, "shape": [len(indices)]}}
        arrays.update(
            {name: {"dtype": dtype.str, "shape": list(shape)} for name, (dtype, shape) in layout.items()}
        )
        header = {
            "format": FORMAT,
            "version": VERSION,
            **identity,
            "encoding": encoding.describe(),
            "num_classes": int(num_classes),
            "num_views": num_views,
            "length": len(indices),
            "byteorder": "little",
            "arrays": arrays,
            # Who is writing: a later build leaves this directory alone while the process lives.
            "build": {"host": socket.gethostname(), "pid": os.getpid()},
            "complete": False,
        }
        # The header first: from its first file on, the directory is recognisably ours (remove_leftovers).
        _write_json(tmp / HEADER, header)
        (tmp / INDEX).write_bytes(indices.tobytes())
        for name, (dtype, shape) in layout.items():
            # Sized, not written: a sparse file that each process fills with its own rows.
            with open(tmp / name, "wb") as f:
                f.truncate(math.prod(shape) * dtype.itemsize)
        writer = cls(path, tmp, header)
        writer.removed_leftovers = removed
        return writer

    @classmethod
    def attach(cls, path: str | Path, token: str) -> StoreWriter:
        """Join the build ``token`` of the store at ``path`` that another process created."""
        path = Path(path)
        tmp = temp_path(path, token)
        return cls(path, tmp, json.loads((tmp / HEADER).read_text()))

    def write(self, view: int, start: int, logits: Tensor) -> None:
        """Encode ``logits`` (``(n, C)``, any float dtype) into rows ``start .. start + n`` of ``view``.

        Top-k log-probabilities are floored at :data:`LOG_PROB_FLOOR` (their ``exp`` is 0 either way), so
        that every stored value is finite (``log_residual`` is ``-inf`` when ``k == C``).

        Raises:
            ValueError: ``logits`` is not ``(n, C)``.
            StoreError: a logit is not finite (NaN or inf: a diverged teacher), or overflows the store's
                dtype (fp16 holds magnitudes up to 65504); the message names the view, row and sample index.
                Nothing of that batch is written.
        """
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"soft-target store {str(self.path)!r}: expected logits of shape (n, {self.num_classes}), "
                f"got {tuple(logits.shape)}."
            )
        stop = start + logits.shape[0]
        logits = logits.detach().float().cpu()
        self._check_finite(logits, view, start, "the teacher's logits are not finite")
        if self.encoding.kind == "logits":
            encoded = self._encode(logits)
            self._check_finite(
                self._decode(encoded), view, start, f"the teacher's logits overflow {self.encoding.dtype}"
            )
            self._arrays["logits.bin"][view, start:stop] = encoded
            return
        values, classes, log_residual = topk_encode(logits, self.encoding.top_k)
        values = values.clamp_min(LOG_PROB_FLOOR)
        if self.encoding.top_k < self.num_classes:
            log_residual = log_residual.clamp_min(LOG_PROB_FLOOR)
        self._arrays["values.bin"][view, start:stop] = self._encode(values)
        self._arrays["classes.bin"][view, start:stop] = classes.numpy()
        self._arrays["log_residual.bin"][view, start:stop] = self._encode(log_residual)

    def _check_finite(self, t: Tensor, view: int, start: int, what: str) -> None:
        bad = ~torch.isfinite(t).all(-1)
        if not bad.any():
            return
        first = int(bad.nonzero()[0, 0])
        row = start + first
        value = t[first][~torch.isfinite(t[first])][0].item()
        raise StoreError(
            f"soft-target store {str(self.path)!r}: {what} at view {view}, row {row} (sample index "
            f"{int(self.indices[row])}): value {value}, {int(bad.sum())} of the {len(t)} rows of this batch "
            f"(rows {start}..{start + len(t) - 1}). Nothing of that batch was written and the store will not "
            "be published: fix the teacher (or, for an overflow, store dtype float32 or bfloat16)."
        )

    def _encode(self, t: Tensor) -> np.ndarray:
        t = t.to(_TORCH[self.encoding.dtype])
        if self.encoding.dtype == "bfloat16":
            t = t.view(torch.int16)
        return t.numpy().view(_NUMPY[self.encoding.dtype])

    def _decode(self, array: np.ndarray) -> Tensor:
        if self.encoding.dtype == "bfloat16":
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).float()
        return torch.from_numpy(array).float()

    def close(self) -> None:
        """Flush this process's rows to disk."""
        for array in self._arrays.values():
            array.flush()
        self._arrays = {}

    def commit(self, build: Mapping[str, Any] | None = None) -> SoftTargetStore:
        """Publish the store: checksums, the header with ``"complete": true`` last, then the directory.

        One read pass over every array computes its checksum and checks its values (the rows of every
        process). A store already at the final path is moved aside and deleted only once the new one is
        in place, and only the files its header lists. Call it on one process, after every process has
        closed its writer.

        Args:
            build: how the store was built (precision, world size, seconds ...), for the header.

        Raises:
            StoreError: the final path exists and is not a soft-target store, or holds a file its store did
                not write (:func:`check_replaceable`); it is left untouched, and the temporary directory
                is removed.
            CorruptStoreError: a written value is not finite (the message names the array and first row);
                nothing is published and the temporary directory is removed.
        """
        self.close()
        try:
            if self.path.exists():
                try:
                    read_header(self.path)
                except StaleStoreError:
                    pass  # an older version of our format: ours to replace
                except StoreError as err:
                    raise StoreError(
                        f"refusing to replace {str(self.path)!r}, which is not a soft-target store: {err}"
                    ) from err
                check_replaceable(self.path)
            sums = _scan_store(self.tmp, self.header, self.indices, check_sums=False)
        except StoreError:
            self.abort()
            raise
        header = dict(self.header)
        header["arrays"] = {name: {**spec, "sha256": sums[name]} for name, spec in header["arrays"].items()}
        header["build"] = {"python": sys.version.split()[0], "torch": torch.__version__, **(build or {})}
        header.pop("complete", None)
        header["complete"] = True  # the last key, and the file is replaced in one rename
        staged = self.tmp / (HEADER + ".new")
        _write_json(staged, header)
        os.replace(staged, self.tmp / HEADER)
        _fsync_dir(self.tmp)
        old = None
        if self.path.exists():
            old = self.path.parent / f".{self.path.name}.old-{self.tmp.name.rsplit('-', 1)[-1]}"
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        if old is not None:
            old_header = _raw_header(old)
            if old_header is not None:
                _remove_own(old, old_header)
        return SoftTargetStore.open(self.path, verify=False)  # its bytes were just hashed and checked

    def abort(self) -> None:
        """Remove the temporary directory (a failed build): its own files only; the final path is never touched."""
        self._arrays = {}
        if self.tmp.is_dir():
            _remove_own(self.tmp, self.header)
