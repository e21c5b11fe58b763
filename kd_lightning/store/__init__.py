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

from kd_lightning.store.files import (
    check_can_build,
    check_replaceable,
    foreign_files,
    new_token,
    remove_leftovers,
    temp_path,
)
from kd_lightning.store.format import (
    DTYPES,
    FORMAT,
    HEADER,
    INDEX,
    KINDS,
    LOG_PROB_FLOOR,
    RESIDUAL_RULE,
    VERSION,
    CorruptStoreError,
    Encoding,
    StaleStoreError,
    StoreError,
    array_sha256,
    check_top_k,
    compare,
    describe,
    file_sha256,
    read_header,
    teacher_fingerprint,
    topk_encode,
    topk_log_probs,
)
from kd_lightning.store.reader import SoftTargetStore
from kd_lightning.store.verify import ScanResult, scan_array, value_checks
from kd_lightning.store.writer import StoreWriter

__all__ = [
    "CorruptStoreError",
    "DTYPES",
    "Encoding",
    "FORMAT",
    "HEADER",
    "INDEX",
    "KINDS",
    "LOG_PROB_FLOOR",
    "RESIDUAL_RULE",
    "ScanResult",
    "SoftTargetStore",
    "StaleStoreError",
    "StoreError",
    "StoreWriter",
    "VERSION",
    "array_sha256",
    "check_can_build",
    "check_replaceable",
    "check_top_k",
    "compare",
    "describe",
    "file_sha256",
    "foreign_files",
    "new_token",
    "read_header",
    "remove_leftovers",
    "scan_array",
    "teacher_fingerprint",
    "temp_path",
    "topk_encode",
    "topk_log_probs",
    "value_checks",
]
