"""The soft-target store: a teacher's outputs on disk, read back by sample index (and view).

One store holds one split of one dataset, as a directory::

    header.json        what the store is (below); "complete": true only once every array is written
    index.bin          int64 (L,)     the sample index (position in the source split) of each row
    logits.bin         (V, L, C)      raw logits at T = 1                      kind "logits"
    values.bin         (V, L, k)      top-k log-probabilities at T = 1, sorted kind "topk"
    classes.bin        (V, L, k)      their class ids (uint8 / uint16 / int32)
    log_residual.bin   (V, L)         log of the probability mass outside the top k

``V`` is the number of augmentation views per sample (1 when the teacher saw the un-augmented input),
``L`` the number of samples and ``C`` the number of classes. Arrays are raw C-order little-endian
memory maps whose dtype and shape the header records (bf16, which numpy lacks, is stored as its 16-bit
pattern); reading a batch is one numpy gather per array, whatever the batch size.

The header records the format and version, the encoding (kind, dtype, k, the residual rule), the
teacher's fingerprint (:func:`teacher_fingerprint`), the dataset's (name, split, length, hashes of
targets, indices and a sample of inputs), the transform the teacher saw, the number of classes and of
views, per-array SHA-256 checksums and, last, ``"complete": true``.

Writes are atomic: :class:`StoreWriter` fills a hidden temporary directory beside the final path, writes
the header there last, then renames the directory into place (moving any store it replaces aside and
deleting it only after the new one is in place). A crash leaves at worst a hidden temporary
directory, never a store that looks complete; :meth:`SoftTargetStore.open` refuses incomplete,
truncated and foreign directories, and :func:`compare` lists how a store differs from what a run needs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

FORMAT = "kd-lightning/soft-targets"
VERSION = 1
KINDS = ("logits", "topk")
DTYPES = ("float32", "float16", "bfloat16")
HEADER = "header.json"
INDEX = "index.bin"
#: Residual rule of top-k stores, recorded in their header.
RESIDUAL_RULE = (
    "uniform: the probability mass outside the top k (stored as log_residual) is spread evenly over "
    "the other C - k classes; the result is renormalised"
)
# Reconstructed log-probabilities are floored here: exp() is 0 in fp32 either way, but a -inf logit
# would turn 0 * log(0) into NaN in a KL term.
LOG_PROB_FLOOR = -1.0e4
# numpy dtype of each value dtype on disk; bf16 is kept as its bit pattern.
_NUMPY = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class StoreError(ValueError):
    """A soft-target store is incomplete, corrupt, foreign, or not the one a run needs.

    The message names the store's path and what was expected and found.
    """


class StaleStoreError(StoreError):
    """A complete store that does not match the current teacher, data, transform or encoding.

    Attributes:
        differences: one line per differing field, ``"<field>: store has X, this run has Y"``.
    """

    def __init__(self, message: str, differences: list[str]) -> None:
        super().__init__(message)
        self.differences = differences


# ---------------------------------------------------------------------------------------------
# The maths of top-k soft targets


def topk_encode(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Encode logits as their top-k log-probabilities at ``T = 1``, the classes, and the rest's log-mass.

    The residual is computed in log space (``logsumexp`` of the other classes' log-probabilities),
    so it stays exact when it is far below the float resolution of ``1 - sum(top-k)``.

    Args:
        logits: ``(..., C)`` raw logits.
        k: number of classes kept, ``1 <= k <= C``.

    Returns:
        ``(values, classes, log_residual)``: ``(..., k)`` fp32 log-probabilities in decreasing order,
        ``(..., k)`` int64 class ids, ``(...)`` fp32 log of the mass outside them (``-inf`` if ``k == C``).

    Raises:
        ValueError: ``k`` is not in ``[1, C]``.

    Example:
        >>> v, c, r = topk_encode(torch.tensor([[0.0, 2.0, 1.0]]), k=1)
        >>> c.tolist(), round(float(v.exp() + r.exp()), 6)
        ([[1]], 1.0)
    """
    num_classes = logits.shape[-1]
    check_top_k(k, num_classes)
    log_p = F.log_softmax(logits.float(), dim=-1)
    values, classes = log_p.topk(k, dim=-1)
    log_residual = log_p.scatter(-1, classes, float("-inf")).logsumexp(-1)
    return values, classes, log_residual


def topk_log_probs(values: Tensor, classes: Tensor, log_residual: Tensor, num_classes: int) -> Tensor:
    """Full log-probabilities from top-k: the stored rule of top-k stores (:data:`RESIDUAL_RULE`).

    The ``k`` stored classes keep their log-probabilities, the residual mass is spread uniformly over
    the other ``C - k`` classes, and the result is renormalised (stored values are rounded), so its
    ``exp`` sums to one. Used as logits, its softmax at ``T = 1`` is exactly this distribution; at
    another temperature ``T`` it is ``p_i ** (1/T)`` renormalised, the teacher's own tempered
    distribution on the top k with a flat tail: the tail's ranking, which the store dropped, is not
    recovered. Values are floored at :data:`LOG_PROB_FLOOR` so that no entry is ``-inf``.

    Args:
        values: ``(..., k)`` log-probabilities of the top-k classes.
        classes: ``(..., k)`` their class ids.
        log_residual: ``(...)`` log of the mass outside the top k.
        num_classes: ``C``.

    Returns:
        ``(..., C)`` fp32 log-probabilities.

    Raises:
        ValueError: ``k > num_classes`` or mismatched shapes.

    Example:
        >>> v = torch.tensor([[0.5, 0.3]]).log(); c = torch.tensor([[2, 0]]); r = torch.tensor([0.2]).log()
        >>> topk_log_probs(v, c, r, num_classes=4).exp()
        tensor([[0.3000, 0.1000, 0.5000, 0.1000]])
    """
    k = values.shape[-1]
    check_top_k(k, num_classes)
    if classes.shape != values.shape or log_residual.shape != values.shape[:-1]:
        raise ValueError(
            "top-k `values` and `classes` must have the same shape (..., k) and `log_residual` shape "
            f"(...), got {tuple(values.shape)}, {tuple(classes.shape)} and {tuple(log_residual.shape)}."
        )
    values = values.float()
    if k == num_classes:
        fill = torch.full_like(log_residual, LOG_PROB_FLOOR, dtype=torch.float32)
    else:
        fill = log_residual.float() - math.log(num_classes - k)
    full = fill.unsqueeze(-1).expand(*values.shape[:-1], num_classes).clone()
    full.scatter_(-1, classes.long(), values)
    full = full.clamp_min(LOG_PROB_FLOOR)
    return (full - full.logsumexp(-1, keepdim=True)).clamp_min(LOG_PROB_FLOOR)


def check_top_k(k: int, num_classes: int) -> None:
    """Raise a ValueError naming ``top_k`` unless ``1 <= k <= num_classes``."""
    if not (isinstance(k, int) and 1 <= k <= num_classes):
        raise ValueError(f"`top_k` must be an integer in [1, num_classes={num_classes}], got {k!r}.")


# ---------------------------------------------------------------------------------------------
# Fingerprints


def teacher_fingerprint(teacher: nn.Module) -> str:
    """SHA-256 of a module's architecture (its ``repr``) and every tensor of its ``state_dict``.

    Names, dtypes, shapes and bytes all count, buffers (BatchNorm statistics) included; the device
    does not. Fingerprint the teacher as loaded, before a Trainer converts it to another precision.

    Example:
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> teacher_fingerprint(a) == teacher_fingerprint(a), teacher_fingerprint(a) == teacher_fingerprint(b)
        (True, False)
    """
    h = hashlib.sha256(repr(teacher).encode())
    for name, tensor in sorted(teacher.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"\0{name}\0{t.dtype}\0{tuple(tensor.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes, read in chunks (a teacher checkpoint, an array of the store)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()


def array_sha256(array: np.ndarray | Tensor) -> str:
    """Short SHA-256 of an array's values (C order), e.g. of a split's indices.

    Example:
        >>> array_sha256(np.arange(3)) == array_sha256(torch.arange(3))
        True
    """
    if isinstance(array, Tensor):
        array = array.detach().cpu().numpy()
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def describe(obj: object) -> str | None:
    """A description of ``obj`` that is the same in every process and run: its ``repr``, unless that is
    Python's default ``<... at 0x...>``, in which case its class and attributes.

    Example:
        >>> class Jitter:
        ...     def __init__(self): self.scale = 0.1
        >>> describe(Jitter()).endswith("Jitter(scale=0.1)"), describe(None)
        (True, None)
    """
    if obj is None:
        return None
    cls = type(obj)
    if cls.__repr__ is not object.__repr__:
        return repr(obj)
    attrs = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(obj).items()))
    return f"{cls.__module__}.{cls.__qualname__}({attrs})"


# ---------------------------------------------------------------------------------------------
# Encoding and comparison


@dataclass(frozen=True)
class Encoding:
    """How soft targets are written: full logits, or top-k with the residual rule.

    Args:
        kind: ``"logits"`` (all ``C`` logits) or ``"topk"`` (``top_k`` log-probabilities and classes,
            plus the residual mass).
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` for logits / top-k values.
        top_k: ``k`` for ``kind="topk"``; must be ``None`` for ``"logits"``.

    Raises:
        ValueError: an unknown kind or dtype, or ``top_k`` missing, given for logits, or below 1.

    Example:
        >>> Encoding("topk", "float16", top_k=3).bytes_per_sample(num_classes=10)
        11
    """

    kind: str = "logits"
    dtype: str = "float16"
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}, got {self.kind!r}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {DTYPES}, got {self.dtype!r}.")
        if self.kind == "logits" and self.top_k is not None:
            raise ValueError(
                f"`top_k` applies to kind='topk' only, got top_k={self.top_k!r} with kind='logits'."
            )
        if self.kind == "topk" and not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise ValueError(f"kind='topk' needs `top_k`, a positive integer, got {self.top_k!r}.")

    def describe(self) -> dict[str, Any]:
        """The header's ``encoding`` entry."""
        out: dict[str, Any] = {"kind": self.kind, "dtype": self.dtype, "top_k": self.top_k}
        out["residual"] = RESIDUAL_RULE if self.kind == "topk" else None
        return out

    def arrays(
        self, views: int, length: int, num_classes: int
    ) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """File name -> (numpy dtype, shape) of every array but the index.

        Raises:
            ValueError: ``top_k`` exceeds ``num_classes``.
        """
        value = _NUMPY[self.dtype]
        if self.kind == "logits":
            return {"logits.bin": (value, (views, length, num_classes))}
        check_top_k(self.top_k, num_classes)
        k = self.top_k
        return {
            "values.bin": (value, (views, length, k)),
            "classes.bin": (_class_dtype(num_classes), (views, length, k)),
            "log_residual.bin": (value, (views, length)),
        }

    def bytes_per_sample(self, num_classes: int) -> int:
        """Bytes on disk per sample and view (the index adds 8 per sample)."""
        return sum(
            dtype.itemsize * shape[-1] if len(shape) == 3 else dtype.itemsize
            for dtype, shape in self.arrays(1, 1, num_classes).values()
        )


def _class_dtype(num_classes: int) -> np.dtype:
    if num_classes <= 1 << 8:
        return np.dtype("u1")
    return np.dtype("<u2") if num_classes <= 1 << 16 else np.dtype("<i4")


def compare(header: Mapping[str, Any], expected: Mapping[str, Any], prefix: str = "") -> list[str]:
    """How a store's header differs from what a run expects: one line per differing field.

    Only the fields present in ``expected`` are compared (recursively), so a caller can check a
    teacher by checkpoint hash without loading it and by weights otherwise.

    Example:
        >>> compare({"dataset": {"name": "a", "length": 3}}, {"dataset": {"name": "b"}})
        ["dataset.name: store has 'a', this run has 'b'"]
    """
    out = []
    for key, want in expected.items():
        name = f"{prefix}{key}"
        have = header.get(key, "<missing>") if isinstance(header, Mapping) else "<missing>"
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            out += compare(have, want, prefix=f"{name}.")
        elif _jsonable(have) != _jsonable(want):
            out.append(f"{name}: store has {_short(have)}, this run has {_short(want)}")
    return out


def _jsonable(value: Any) -> Any:
    # Tuples and lists compare equal once they have made the round trip through JSON.
    return json.loads(json.dumps(value))


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Reading


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
    def open(cls, path: str | Path) -> SoftTargetStore:
        """Open the complete store at ``path``.

        Raises:
            FileNotFoundError: no directory at ``path``.
            StoreError: no or unreadable header, another format or version, an incomplete build, or an
                array file missing or of the wrong size (truncated); the message names the path.
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
        return cls(path, header, arrays)

    def verify(self) -> None:
        """Recompute every array's SHA-256 and compare with the header (reads the whole store).

        Raises:
            StoreError: an array's bytes changed since the store was written.
        """
        for name, spec in self.header["arrays"].items():
            found = file_sha256(self.path / name)
            if found != spec["sha256"]:
                raise StoreError(
                    f"soft-target store {str(self.path)!r}: array file {name!r} has checksum {found}, the "
                    f"header records {spec['sha256']}: it changed after the store was written. Rebuild it."
                )

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


def read_header(path: str | Path) -> dict[str, Any]:
    """The parsed header of the store at ``path``, complete or not.

    Raises:
        FileNotFoundError: no directory at ``path``.
        StaleStoreError: a store of another format version.
        StoreError: the directory is not a soft-target store.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"soft-target store {str(path)!r}: no such directory.")
    try:
        header = json.loads((path / HEADER).read_text())
    except (OSError, ValueError) as err:
        raise StoreError(
            f"{str(path)!r} is not a soft-target store: cannot read its {HEADER} ({err})."
        ) from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise StoreError(f"{str(path)!r} is not a soft-target store: {HEADER} has no format {FORMAT!r}.")
    if header.get("version") != VERSION:
        raise StaleStoreError(
            f"soft-target store {str(path)!r} has format version {header.get('version')!r}; this "
            f"kd-lightning reads version {VERSION}. Rebuild it.",
            [f"version: store has {header.get('version')!r}, this run has {VERSION}"],
        )
    return header


# ---------------------------------------------------------------------------------------------
# Writing


def temp_path(path: str | Path, token: str) -> Path:
    """The hidden directory beside ``path`` that a build with ``token`` writes into."""
    path = Path(path)
    return path.parent / f".{path.name}.tmp-{token}"


def new_token() -> str:
    """A fresh build token (share rank 0's with every process of a distributed build)."""
    return uuid.uuid4().hex[:12]


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
        >>> shutil.rmtree(root)
    """

    def __init__(self, path: Path, tmp: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.tmp = tmp
        self.header = header
        self.encoding = Encoding(**{k: header["encoding"][k] for k in ("kind", "dtype", "top_k")})
        self.num_classes = int(header["num_classes"])
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
        tmp = temp_path(path, token or new_token())
        tmp.mkdir(parents=True)
        (tmp / INDEX).write_bytes(indices.tobytes())
        arrays = {INDEX: {"dtype": indices.dtype.str, "shape": [len(indices)]}}
        for name, (dtype, shape) in layout.items():
            # Sized, not written: a sparse file that each process fills with its own rows.
            with open(tmp / name, "wb") as f:
                f.truncate(math.prod(shape) * dtype.itemsize)
            arrays[name] = {"dtype": dtype.str, "shape": list(shape)}
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
            "complete": False,
        }
        _write_json(tmp / HEADER, header)
        return cls(path, tmp, header)

    @classmethod
    def attach(cls, path: str | Path, token: str) -> StoreWriter:
        """Join the build ``token`` of the store at ``path`` that another process created."""
        path = Path(path)
        tmp = temp_path(path, token)
        return cls(path, tmp, json.loads((tmp / HEADER).read_text()))

    def write(self, view: int, start: int, logits: Tensor) -> None:
        """Encode ``logits`` (``(n, C)``, any float dtype) into rows ``start .. start + n`` of ``view``."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"soft-target store {str(self.path)!r}: expected logits of shape (n, {self.num_classes}), "
                f"got {tuple(logits.shape)}."
            )
        stop = start + logits.shape[0]
        logits = logits.detach().float().cpu()
        if self.encoding.kind == "logits":
            self._arrays["logits.bin"][view, start:stop] = self._encode(logits)
            return
        values, classes, log_residual = topk_encode(logits, self.encoding.top_k)
        self._arrays["values.bin"][view, start:stop] = self._encode(values)
        self._arrays["classes.bin"][view, start:stop] = classes.numpy()
        self._arrays["log_residual.bin"][view, start:stop] = self._encode(log_residual)

    def _encode(self, t: Tensor) -> np.ndarray:
        t = t.to(_TORCH[self.encoding.dtype])
        if self.encoding.dtype == "bfloat16":
            t = t.view(torch.int16)
        return t.numpy().view(_NUMPY[self.encoding.dtype])

    def close(self) -> None:
        """Flush this process's rows to disk."""
        for array in self._arrays.values():
            array.flush()
        self._arrays = {}

    def commit(self, build: Mapping[str, Any] | None = None) -> SoftTargetStore:
        """Publish the store: checksums, the header with ``"complete": true`` last, then the directory.

        A store already at the final path is moved aside and deleted only once the new one is in
        place. Call it on one process, after every process has closed its writer.

        Args:
            build: how the store was built (precision, world size, seconds ...), for the header.

        Raises:
            StoreError: the final path exists and is not a soft-target store (it is left untouched,
                and the temporary directory is removed).
        """
        self.close()
        if self.path.exists():
            try:
                read_header(self.path)
            except StoreError as err:
                self.abort()
                raise StoreError(
                    f"refusing to replace {str(self.path)!r}, which is not a soft-target store: {err}"
                ) from err
        header = dict(self.header)
        header["arrays"] = {
            name: {**spec, "sha256": file_sha256(self.tmp / name)} for name, spec in header["arrays"].items()
        }
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
            shutil.rmtree(old, ignore_errors=True)
        return SoftTargetStore.open(self.path)

    def abort(self) -> None:
        """Remove the temporary directory (a failed build); the final path is never touched."""
        self._arrays = {}
        shutil.rmtree(self.tmp, ignore_errors=True)


def _write_json(path: Path, obj: Mapping[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # A rename is durable once its directory is synced; some filesystems cannot open directories.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
