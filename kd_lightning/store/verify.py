"""Verifying a store's bytes: one read pass over each array gives its SHA-256 and its non-finite values.

Used by :meth:`~kd_lightning.store.StoreWriter.commit` (checksums for the header, values checked again)
and :meth:`~kd_lightning.store.SoftTargetStore.verify` (checksums compared with the header).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kd_lightning.store.format import _NUMPY, CorruptStoreError, Encoding

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
        >>> from kd_lightning.store.format import file_sha256
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
