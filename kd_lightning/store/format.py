"""The store's format, the lowest layer of :mod:`kd_lightning.store` (it imports none of the others).

Names and version of the format, the errors, the maths of top-k soft targets, fingerprints of teachers,
files and arrays, the :class:`Encoding`, and reading and comparing a store's header.
"""

from __future__ import annotations

import hashlib
import json
import math
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
        >>> c.tolist(), round(float(v.exp() + r.exp()), 5)
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
# The header


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
