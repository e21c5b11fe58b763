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

Writes are atomic: :class:`StoreWriter` fills a hidden temporary directory ``.<name>.tmp-<token>``
beside the final path, writes the complete header there last, then renames the directory into place
(moving any store it replaces aside as ``.<name>.old-<token>`` and deleting it only after the new one is
in place). A crash leaves at worst a hidden temporary directory, never a store that looks complete; the
next build of the same store removes it (:func:`remove_leftovers`: only directories of that name that
hold a header of this format and no file the store did not write).

What is verified, when:

- **writing** (:meth:`StoreWriter.write`): the teacher's outputs are finite, and so is what the dtype on
  disk makes of them (an fp16 logit beyond 65504 is refused, not stored as inf); top-k log-probabilities
  are floored at :data:`LOG_PROB_FLOOR` (``exp`` is 0 either way), so every stored value is finite
  except ``log_residual`` when ``k == C``, which is ``-inf`` (no mass outside the top k).
- **committing** (:meth:`StoreWriter.commit`): one read pass over every array computes its SHA-256 for
  the header and checks every value again (rows written by other processes included); a non-finite
  value, or a file in the directory being replaced that the old store did not write, aborts the build
  and nothing is published or deleted.
- **before a build** (:func:`check_can_build`): the directory can be created and written (a real write
  probe, not permission bits), no file stands where the store's directory should be, and a store it
  would replace holds only its own files.
- **opening** (:meth:`SoftTargetStore.open`, by default): header format, version and completeness,
  array sizes, then :meth:`SoftTargetStore.verify`: one read pass over every array, comparing its SHA-256
  with the header and checking every soft target is finite (``log_residual`` may be ``-inf`` only when
  ``k == C``). It reads the whole store once (about 1 GB/s, see ``scripts/benchmark_cache.py``);
  ``open(path, verify=False)`` skips it where the bytes were just checked (right after a commit).

:meth:`SoftTargetStore.open` refuses incomplete, truncated, corrupt and foreign directories, naming the
array and, for non-finite values, the first bad row; :func:`compare` lists how a store differs from what
a run needs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import sys
import uuid
import warnings
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


class CorruptStoreError(StoreError):
    """A complete store whose bytes are not what its header says, or that holds non-finite soft targets.

    Attributes:
        array: the array file at fault, e.g. ``"logits.bin"``.
        row: ``(view, row, sample index)`` of the first non-finite soft target, or ``None`` when only the
            checksum differs.
    """

    def __init__(self, message: str, array: str, row: tuple[int, int, int] | None = None) -> None:
        super().__init__(message)
        self.array = array
        self.row = row


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
# Verifying: checksum and values in one read pass

# Bit pattern of each value dtype: (unsigned view, exponent mask, -inf). A value is finite unless all its
# exponent bits are set (inf or NaN); comparing bits is five times faster than np.isfinite on fp16.
_BITS = {
    "float32": (np.dtype("<u4"), 0x7F800000, 0xFF800000),
    "float16": (np.dtype("<u2"), 0x7C00, 0xFC00),
    "bfloat16": (np.dtype("<u2"), 0x7F80, 0xFF80),
}
_CHUNK_BYTES = 1 << 20  # fits in the CPU caches: 16 MiB chunks hash 25% slower


@dataclass(frozen=True)
class ScanResult:
    """What one read pass over an array found.

    Attributes:
        sha256: the file's checksum, ``"sha256:<hex>"``.
        bad_rows: number of rows (of the flattened leading dimensions) holding a refused value.
        first_bad: flat index of the first such row, or ``None``.
        first_value: the first refused value (``nan``, ``inf``, ``-inf``), or ``None``.
    """

    sha256: str
    bad_rows: int = 0
    first_bad: int | None = None
    first_value: float | None = None


def scan_array(
    file: str | Path,
    shape: tuple[int, ...],
    itemsize: int,
    values: str | None = None,
    allow_neg_inf: bool = False,
    chunk_bytes: int = _CHUNK_BYTES,
) -> ScanResult:
    """SHA-256 of an array file and, from the same chunks, the rows holding non-finite values.

    A row is the last dimension of a 3-d array and one element of a 2-d one; chunks hold whole rows, so
    the file is read exactly once, whatever its size.

    Args:
        file: the array file.
        shape: its shape; the file holds ``prod(shape) * itemsize`` bytes.
        itemsize: bytes per element.
        values: value dtype to check (``"float32"``, ``"float16"``, ``"bfloat16"``), or ``None`` to only
            hash (the index, class ids).
        allow_neg_inf: ``-inf`` is a valid value (``log_residual`` when ``k == C``).
        chunk_bytes: read size, rounded down to whole rows.

    Raises:
        OSError: the file cannot be read.

    Example:
        >>> import tempfile
        >>> f = Path(tempfile.mkdtemp()) / "a.bin"
        >>> _ = f.write_bytes(np.array([[0, 1], [np.nan, 2], [3, np.inf]], "<f2").tobytes())
        >>> r = scan_array(f, (1, 3, 2), 2, "float16")  # 1 view, 3 rows of 2 classes
        >>> r.bad_rows, r.first_bad, r.first_value
        (2, 1, nan)
        >>> r.sha256 == file_sha256(f)
        True
    """
    row_elems = shape[-1] if len(shape) >= 3 else 1
    row_bytes = max(1, row_elems * itemsize)
    chunk = max(1, chunk_bytes // row_bytes) * row_bytes
    h = hashlib.sha256()
    bad_rows, first_bad, first_value, rows_done = 0, None, None, 0
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(file, "rb") as f:
        while n := f.readinto(view):
            if n % row_bytes:  # a short read mid-row (pipes, some network filesystems): finish the row
                while n % row_bytes and (more := f.readinto(view[n:chunk])):
                    n += more
            h.update(view[:n])
            if values is not None:
                utype, exponent, neg_inf = _BITS[values]
                bits = np.frombuffer(buffer, utype, count=n // utype.itemsize)
                bad = (bits & exponent) == exponent
                if allow_neg_inf:
                    bad &= bits != neg_inf
                if bad.any():
                    rows = bad.reshape(-1, row_elems).any(1)
                    bad_rows += int(rows.sum())
                    if first_bad is None:
                        first_bad = rows_done + int(np.argmax(rows))
                        first_value = _as_float(bits[int(np.argmax(bad))], values)
            rows_done += n // row_bytes
    return ScanResult("sha256:" + h.hexdigest(), bad_rows, first_bad, first_value)


def _as_float(bits: np.integer, dtype: str) -> float:
    if dtype == "bfloat16":  # the upper half of a float32
        return float(np.array([int(bits) << 16], "<u4").view("<f4")[0])
    return float(np.array([bits]).view(_NUMPY[dtype])[0])


def value_checks(encoding: Encoding, num_classes: int) -> dict[str, tuple[str, bool]]:
    """Array name -> (value dtype, whether ``-inf`` is allowed) of the arrays whose values are checked.

    Example:
        >>> value_checks(Encoding("topk", "float16", 3), 3)
        {'values.bin': ('float16', False), 'log_residual.bin': ('float16', True)}
    """
    if encoding.kind == "logits":
        return {"logits.bin": (encoding.dtype, False)}
    return {
        "values.bin": (encoding.dtype, False),
        "log_residual.bin": (encoding.dtype, encoding.top_k == num_classes),
    }


def _scan_store(
    path: Path, header: Mapping[str, Any], indices: np.ndarray, check_sums: bool
) -> dict[str, str]:
    """Scan every array of the store (or build) at ``path``; return the checksums.

    Raises:
        CorruptStoreError: a non-finite value, or (``check_sums``) a checksum that differs from the header.
    """
    encoding = Encoding(**{k: header["encoding"][k] for k in ("kind", "dtype", "top_k")})
    checks = value_checks(encoding, int(header["num_classes"]))
    sums = {}
    for name, spec in header["arrays"].items():
        shape = tuple(spec["shape"])
        values, neg_inf = checks.get(name, (None, False))
        if math.prod(shape) == 0:
            sums[name] = "sha256:" + hashlib.sha256(b"").hexdigest()
            continue
        found = scan_array(path / name, shape, np.dtype(spec["dtype"]).itemsize, values, neg_inf)
        sums[name] = found.sha256
        changed = check_sums and found.sha256 != spec.get("sha256")
        if found.first_bad is not None:
            length = shape[1]
            view, row = divmod(found.first_bad, length)
            sample = int(indices[row]) if row < len(indices) else -1
            allowed = "finite (or -inf, as top-k == num_classes writes it)" if neg_inf else "finite"
            raise CorruptStoreError(
                f"soft-target store {str(path)!r}: array {name!r} holds non-finite soft targets: "
                f"{found.bad_rows} of its {math.prod(shape[:2])} rows, the first at view {view}, row {row} "
                f"(sample index {sample}), value {found.first_value}; every value must be {allowed}. "
                + (
                    f"Its checksum differs from the header's too ({found.sha256}, header "
                    f"{spec.get('sha256')}): the file changed after the store was written."
                    if changed
                    else "Its checksum is the one the header records: the store was written so."
                )
                + " Rebuild the store.",
                name,
                (view, row, sample),
            )
        if changed:
            raise CorruptStoreError(
                f"soft-target store {str(path)!r}: array {name!r} has checksum {found.sha256}, the header "
                f"records {spec.get('sha256')}: its bytes changed after the store was written. Rebuild it.",
                name,
            )
    return sums


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


def read_header(path: str | Path) -> dict[str, Any]:
    """The parsed header of the store at ``path``, complete or not.

    Raises:
        FileNotFoundError: no directory at ``path``.
        StaleStoreError: a store of another format version.
        StoreError: the directory is not a soft-target store, or ``path`` is a file.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StoreError(
            f"{str(path)!r} is not a soft-target store: it is a file, where the store's directory should be; "
            "move it away."
        )
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


def _own_files(header: Mapping[str, Any]) -> set[str]:
    # What a store (or a build) writes into its directory: its arrays, its header, the staged header.
    return {*header.get("arrays", {}), HEADER, HEADER + ".new"}


def _raw_header(path: Path) -> dict[str, Any] | None:
    """The header of our format in directory ``path`` (any version, complete or not), or ``None``."""
    try:
        header = json.loads((path / HEADER).read_text())
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) and header.get("format") == FORMAT else None


def foreign_files(path: str | Path) -> list[str]:
    """Names in the store directory ``path`` that its header does not list (so the store did not write).

    Returns ``[]`` when ``path`` is not a directory.

    Raises:
        StoreError: ``path`` is a directory without a header of this format (not a store at all).
    """
    path = Path(path)
    if not path.is_dir():
        return []
    header = _raw_header(path)
    if header is None:
        raise StoreError(
            f"{str(path)!r} is not a soft-target store: it has no {HEADER} of format {FORMAT!r}."
        )
    own = _own_files(header)
    return sorted(p.name for p in path.iterdir() if p.name not in own)


def check_replaceable(path: str | Path) -> None:
    """Raise unless the store at ``path`` (if any) holds only files it wrote, so replacing it loses nothing.

    Raises:
        StoreError: the directory holds a file (or directory) its header does not list; the message names
            it and says what to do. Nothing is deleted.
    """
    path = Path(path)
    extra = foreign_files(path)
    if extra:
        shown = ", ".join(repr(name) for name in extra[:5]) + (
            f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        )
        raise StoreError(
            f"refusing to replace the soft-target store {str(path)!r}: it holds {shown}, which the store did "
            f"not write (its {HEADER} lists {sorted(_raw_header(path).get('arrays', {}))}), and replacing the "
            f"store would delete it. Move {str(path / extra[0])!r} out of the store directory, or choose "
            "another `path`; nothing was deleted."
        )


def check_can_build(path: str | Path) -> None:
    """Check, before any work, that a store can be built at ``path`` and replace what is there.

    The parent directory is created if missing and must take a new file (a real write probe: permission
    bits say nothing to root or on some network filesystems); an existing store directory must take one
    too (renaming a directory into place and deleting the old store need it), and must hold only its own
    files (:func:`check_replaceable`).

    Raises:
        StoreError: a file stands where the store's directory (or one above it) should be, a directory
            cannot be created or written, or the store holds files it did not write; the message names
            the path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StoreError(
            f"cannot build the soft-target store {str(path)!r}: a file is there, where the store's directory "
            "should be. Move it away, or choose another `path`."
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(
            f"cannot build the soft-target store {str(path)!r}: cannot create its directory "
            f"{str(path.parent)!r} ({err}): remove a file in the way, make the directory above it writable, "
            "or choose another `path`."
        ) from err
    _probe(path.parent, f".{path.name}.probe-{new_token()}", path, "a build writes beside the store")
    if path.is_dir():
        check_replaceable(path)
        _probe(path, f".probe-{new_token()}", path, "replacing the store renames it and deletes its files")


def _probe(directory: Path, name: str, store: Path, why: str) -> None:
    probe = directory / name
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as err:
        raise StoreError(
            f"cannot build the soft-target store {str(store)!r}: cannot write in {str(directory)!r} "
            f"({err.strerror}), and {why}: make {str(directory)!r} writable, or choose another `path`."
        ) from err
    os.close(fd)
    os.unlink(probe)


def remove_leftovers(path: str | Path, keep: str | None = None) -> list[Path]:
    """Remove what interrupted builds of the store at ``path`` left beside it; return what was removed.

    Candidates are the directories ``.<name>.tmp-<token>`` (a build killed before its commit) and
    ``.<name>.old-<token>`` (a replaced store killed before its deletion). Only ours are touched: a
    candidate is removed only if it holds a header of this format, and only the files that header lists
    are deleted (header last). Anything else is left where it is, with a warning: a directory of that name
    without our header, a file the header does not list, or a build still running (its header names a
    live process on this host).

    Args:
        path: the store's final directory.
        keep: a build token whose temporary directory is left alone (the build about to start).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / ".train.tmp-dead").mkdir()
        >>> _ = (root / ".train.tmp-dead" / HEADER).write_text(json.dumps({"format": FORMAT, "arrays": {}}))
        >>> [p.name for p in remove_leftovers(root / "train")], list(root.iterdir())
        (['.train.tmp-dead'], [])
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    prefixes = (f".{path.name}.tmp-", f".{path.name}.old-")
    for entry in sorted(path.parent.iterdir()):
        if not entry.name.startswith(prefixes) or entry.name.rsplit("-", 1)[-1] == keep:
            continue
        header = _raw_header(entry) if entry.is_dir() and not entry.is_symlink() else None
        if header is None:
            warnings.warn(
                f"{str(entry)!r} is named like a leftover build of the soft-target store {str(path)!r} but "
                f"holds no {HEADER} of format {FORMAT!r}: left as it is. Delete it yourself if it is not yours.",
                stacklevel=2,
            )
            continue
        writer = header.get("build", {}) if header.get("complete") is not True else {}
        if writer.get("host") == socket.gethostname() and _alive(writer.get("pid")):
            warnings.warn(
                f"{str(entry)!r}: a build of {str(path)!r} by process {writer['pid']} on this host, which is "
                "still running: left as it is.",
                stacklevel=2,
            )
            continue
        if _remove_own(entry, header):
            removed.append(entry)
    return removed


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_own(directory: Path, header: Mapping[str, Any]) -> bool:
    """Delete the files a store's header lists (the header last), then the directory if it is empty.

    Returns whether the directory is gone; what else it holds is left there, with a warning.
    """
    for name in [*header.get("arrays", {}), HEADER + ".new", HEADER]:
        (directory / name).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        rest = sorted(p.name for p in directory.iterdir())
        warnings.warn(
            f"{str(directory)!r}: removed the soft-target files, left {rest}, which the store did not write.",
            stacklevel=3,
        )
        return False
    return True


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
