"""The soft-target store on its own: formats, top-k maths, fingerprints, atomic writes and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.losses import soft_target_loss
from kd_lightning.store import (
    DTYPES,
    HEADER,
    RESIDUAL_RULE,
    Encoding,
    SoftTargetStore,
    StaleStoreError,
    StoreError,
    StoreWriter,
    compare,
    read_header,
    teacher_fingerprint,
    topk_encode,
    topk_log_probs,
)

C, VIEWS = 7, 2
INDICES = np.array([12, 3, 40, 7, 0, 25, 9, 31, 18])  # not contiguous, not sorted: keys are sample indices
IDENTITY = {
    "teacher": {"fingerprint": "sha256:aaa"},
    "dataset": {"dataset": "tiny", "split": "train", "length": len(INDICES), "targets": "t0"},
    "transform": {"teacher_input": "un-augmented"},
}
ENCODINGS = [Encoding("logits", d) for d in DTYPES] + [
    Encoding("topk", d, k) for d in DTYPES for k in (1, 3, C)
]
EPS32 = torch.finfo(torch.float32).eps
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_logits(seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(VIEWS, len(INDICES), C, generator=torch.Generator().manual_seed(seed))


def write_store(path, encoding: Encoding, logits: torch.Tensor, identity=IDENTITY, chunk: int = 4):
    """Write ``logits`` (V, L, C) in chunks of rows, as a build does, and publish the store."""
    writer = StoreWriter.create(path, encoding, C, INDICES, logits.shape[0], identity)
    for view in range(logits.shape[0]):
        for start in range(0, logits.shape[1], chunk):
            writer.write(view, start, logits[view, start : start + chunk])
    return writer.commit({"note": "test"})


def expected_read(encoding: Encoding, logits: torch.Tensor) -> torch.Tensor:
    """What a store must return for ``logits``: the value rounded to the dtype, or the top-k rule."""
    dtype = TORCH_DTYPES[encoding.dtype]
    if encoding.kind == "logits":
        return logits.to(dtype).float()
    values, classes, log_residual = topk_encode(logits, encoding.top_k)
    return topk_log_probs(values.to(dtype).float(), classes, log_residual.to(dtype).float(), C)


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: f"{e.kind}{e.top_k or ''}-{e.dtype}")
def test_round_trip_every_format(tmp_path, encoding):
    logits = make_logits()
    write_store(tmp_path / "store", encoding, logits)
    store = SoftTargetStore.open(tmp_path / "store")
    assert (store.num_views, store.num_classes, len(store)) == (VIEWS, C, len(INDICES))
    assert store.encoding == encoding

    rows = torch.tensor([4, 0, 8, 4, 2])  # repeats and any order
    views = torch.tensor([1, 0, 1, 0, 1])
    got = store.lookup(torch.from_numpy(INDICES)[rows], views)
    want = expected_read(encoding, logits[views, rows])
    assert got.dtype == torch.float32 and got.shape == (5, C)
    # Both sides decode the same stored values in fp32: at most a few roundings of values of this size.
    torch.testing.assert_close(got, want, rtol=0, atol=4 * EPS32 * float(want.abs().max()))
    if encoding.kind == "topk":
        # The stored classes are the teacher's top k, with their probabilities (to the dtype's precision).
        k = encoding.top_k
        teacher = F.log_softmax(logits[views, rows], -1)
        top = teacher.topk(k).indices
        assert torch.equal(got.topk(k).indices.sort().values, top.sort().values)
        # Stored in the dtype: half an ulp of each log-probability, plus the fp32 renormalisation over C terms.
        eps = torch.finfo(TORCH_DTYPES[encoding.dtype]).eps
        tol = eps * float(teacher.gather(-1, top).abs().max()) + 4 * C * EPS32
        torch.testing.assert_close(got.gather(-1, top), teacher.gather(-1, top), rtol=0, atol=tol)
    # Bytes on disk are what the format says.
    data = sum(
        f.stat().st_size for f in store.path.iterdir() if f.name.endswith(".bin") and f.name != "index.bin"
    )
    assert data == encoding.bytes_per_sample(C) * VIEWS * len(INDICES)
    store.verify()


def test_header_records_what_the_store_is(tmp_path):
    write_store(tmp_path / "s", Encoding("topk", "float16", 3), make_logits())
    header = json.loads((tmp_path / "s" / HEADER).read_text())
    assert header["format"] == "kd-lightning/soft-targets" and header["version"] == 1
    assert header["encoding"] == {"kind": "topk", "dtype": "float16", "top_k": 3, "residual": RESIDUAL_RULE}
    assert header["teacher"] == IDENTITY["teacher"] and header["dataset"] == IDENTITY["dataset"]
    assert (header["num_classes"], header["num_views"], header["length"]) == (C, VIEWS, len(INDICES))
    assert all(spec["sha256"].startswith("sha256:") for spec in header["arrays"].values())
    assert header["build"]["note"] == "test"
    assert list(header)[-1] == "complete" and header["complete"] is True


@pytest.mark.parametrize("k", [1, 2, 4, C - 1, C])
@pytest.mark.parametrize(
    "scale", [1.0, 40.0]
)  # 40: the residual is far below fp16/fp32 resolution of 1 - sum
def test_topk_reconstruction_sums_to_one(k, scale):
    logits = scale * torch.randn(64, C, generator=torch.Generator().manual_seed(k))
    values, classes, log_residual = topk_encode(logits, k)
    for dtype in TORCH_DTYPES.values():
        log_p = topk_log_probs(values.to(dtype), classes, log_residual.to(dtype), C)
        assert torch.isfinite(log_p).all()
        # Renormalised in fp32: a sum of C probabilities, each rounded once.
        torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(64), rtol=0, atol=4 * C * EPS32)
    log_p = topk_log_probs(values, classes, log_residual, C)
    exact = F.log_softmax(logits, -1)
    top = exact.topk(k).indices
    # fp32 log-softmax of logits of this size: relative error of the probabilities ~ eps * (|z| + log C).
    rel = 8 * EPS32 * (float(logits.abs().max()) + math.log(C))
    torch.testing.assert_close(
        log_p.gather(-1, top).exp(), exact.gather(-1, top).exp(), rtol=rel, atol=C * EPS32
    )
    if k < C:
        # The rest share the residual mass equally.
        rest = log_p.exp().scatter(-1, top, 0.0)
        torch.testing.assert_close(rest.sum(-1), log_residual.exp(), rtol=rel, atol=C * EPS32 * 1e-2)
        others = log_p.scatter(-1, top, float("nan"))
        spread = others.nan_to_num(nan=float("-inf")).amax(-1) - others.nan_to_num(nan=float("inf")).amin(-1)
        assert float(spread.max()) <= 4 * EPS32 * float(others.nan_to_num(nan=0.0).abs().max())
    # As teacher logits in a KD loss at any temperature: finite, and zero against itself.
    for temperature in (1.0, 4.0, 20.0):
        # KL(p || p): C terms p * (log p - log p) of one fp32 computation, each zero to rounding, times T^2.
        zero_tol = temperature**2 * C * EPS32
        assert float(soft_target_loss(log_p, log_p, temperature)) == pytest.approx(0.0, abs=zero_tol)
        assert torch.isfinite(soft_target_loss(torch.randn(64, C), log_p, temperature))


def test_topk_larger_than_the_classes_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"top_k.*num_classes=7.*8"):
        Encoding("topk", "float16", 8).arrays(1, 4, C)
    with pytest.raises(ValueError, match="top_k"):
        topk_encode(torch.zeros(2, C), C + 1)
    with pytest.raises(ValueError, match="top_k"):
        StoreWriter.create(tmp_path / "s", Encoding("topk", "float16", 8), C, INDICES, 1, IDENTITY)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    for bad in (
        dict(kind="topk"),
        dict(kind="topk", top_k=0),
        dict(kind="logits", top_k=3),
        dict(dtype="int8"),
    ):
        with pytest.raises(ValueError, match="top_k|dtype"):
            Encoding(**bad)


def test_interrupted_build_is_never_used(tmp_path):
    path = tmp_path / "store"
    writer = StoreWriter.create(path, Encoding("logits", "float32"), C, INDICES, 1, IDENTITY)
    writer.write(0, 0, make_logits()[0, :4])  # ... and the process dies here
    assert not path.exists()
    with pytest.raises(FileNotFoundError, match="store"):
        SoftTargetStore.open(path)
    # The partial build is hidden, and says it is incomplete if opened by its own name.
    (partial,) = tmp_path.iterdir()
    assert partial.name.startswith(".store.tmp-")
    with pytest.raises(StoreError, match=r"incomplete.*build did not finish"):
        SoftTargetStore.open(partial)

    # A rebuild interrupted over a good store leaves the good store as it was.
    old = write_store(path, Encoding("logits", "float32"), make_logits(1))
    before = old.lookup(torch.from_numpy(INDICES), torch.zeros(len(INDICES), dtype=torch.long)).clone()
    again = StoreWriter.create(path, Encoding("logits", "float32"), C, INDICES, VIEWS, IDENTITY)
    again.write(0, 0, make_logits(2)[0, :4])
    again.abort()
    store = SoftTargetStore.open(path)
    torch.testing.assert_close(
        store.lookup(torch.from_numpy(INDICES), torch.zeros(len(INDICES), dtype=torch.long)), before
    )


def test_a_store_marked_incomplete_is_refused(tmp_path):
    write_store(tmp_path / "s", Encoding("logits", "float16"), make_logits())
    header = json.loads((tmp_path / "s" / HEADER).read_text())
    (tmp_path / "s" / HEADER).write_text(json.dumps({**header, "complete": False}))
    with pytest.raises(StoreError, match="incomplete"):
        SoftTargetStore.open(tmp_path / "s")


def test_replacing_a_store_is_atomic(tmp_path):
    path = tmp_path / "store"
    write_store(path, Encoding("logits", "float32"), make_logits(1))
    new = make_logits(2)
    writer = StoreWriter.create(path, Encoding("logits", "float32"), C, INDICES, VIEWS, IDENTITY)
    for view in range(VIEWS):
        writer.write(view, 0, new[view])
    # Until the commit, readers see the old store, complete.
    old = SoftTargetStore.open(path)
    torch.testing.assert_close(old.lookup([12], [0]), make_logits(1)[0, :1])
    store = writer.commit()
    torch.testing.assert_close(store.lookup([12], [1]), new[1, :1])
    assert [p.name for p in tmp_path.iterdir()] == ["store"]  # no temporary or old directory left


def test_truncated_or_changed_array_file(tmp_path):
    path = tmp_path / "store"
    write_store(path, Encoding("logits", "float16"), make_logits())
    data = (path / "logits.bin").read_bytes()
    (path / "logits.bin").write_bytes(data[:-2])
    with pytest.raises(
        StoreError, match=r"store.*'logits\.bin' is \d+ bytes, expected \d+.*truncated"
    ) as err:
        SoftTargetStore.open(path)
    assert str(path) in str(err.value)
    (path / "logits.bin").unlink()
    with pytest.raises(StoreError, match="'logits.bin' is missing"):
        SoftTargetStore.open(path)
    (path / "logits.bin").write_bytes(bytes(len(data)))  # right size, wrong bytes
    with pytest.raises(StoreError, match=r"'logits\.bin' has checksum .* the header records"):
        SoftTargetStore.open(path)  # verified at open
    store = SoftTargetStore.open(path, verify=False)  # only where the caller has just checked the bytes
    with pytest.raises(StoreError, match="checksum"):
        store.verify()


def test_index_or_view_outside_the_store(tmp_path):
    store = write_store(tmp_path / "store", Encoding("logits", "float16"), make_logits())
    with pytest.raises(
        IndexError, match=r"store.*sample index \[5, 999, -1\] \(3 in all\) is not in the store.*9 samples"
    ):
        store.lookup(torch.tensor([3, 5, 999, -1]), torch.zeros(4, dtype=torch.long))
    with pytest.raises(IndexError, match=r"view 2 is not in the store.*views 0\.\.1"):
        store.lookup(torch.tensor([3]), torch.tensor([2]))
    with pytest.raises(IndexError, match="holds 2 views per sample: pass `view`"):
        store.lookup(torch.tensor([3]))


def test_foreign_directory_is_never_replaced(tmp_path):
    path = tmp_path / "data"
    path.mkdir()
    (path / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a soft-target store"):
        SoftTargetStore.open(path)
    writer = StoreWriter.create(path, Encoding("logits", "float32"), C, INDICES, 1, IDENTITY)
    writer.write(0, 0, make_logits()[0])
    with pytest.raises(StoreError, match=r"refusing to replace .*data"):
        writer.commit()
    assert (path / "precious.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_other_format_version_is_stale(tmp_path):
    write_store(tmp_path / "s", Encoding("logits", "float16"), make_logits())
    header = json.loads((tmp_path / "s" / HEADER).read_text())
    (tmp_path / "s" / HEADER).write_text(json.dumps({**header, "version": 99}))
    with pytest.raises(StaleStoreError, match="version 99") as err:
        read_header(tmp_path / "s")
    assert err.value.differences == ["version: store has 99, this run has 1"]


def test_compare_names_each_difference():
    header = {**IDENTITY, "encoding": Encoding("logits", "float16").describe(), "num_views": 2}
    expected = {
        "teacher": {"fingerprint": "sha256:bbb"},
        "dataset": {**IDENTITY["dataset"], "targets": "t1"},
        "transform": {"teacher_input": "augmented", "augmentation": "RandomShift(max_shift=2, hflip=True)"},
        "encoding": Encoding("logits", "float16").describe(),
        "num_views": 2,
    }
    assert compare(header, expected) == [
        "teacher.fingerprint: store has 'sha256:aaa', this run has 'sha256:bbb'",
        "dataset.targets: store has 't0', this run has 't1'",
        "transform.teacher_input: store has 'un-augmented', this run has 'augmented'",
        "transform.augmentation: store has '<missing>', this run has 'RandomShift(max_shift=2, hflip=True)'",
    ]
    assert compare(header, {"dataset": {"length": len(INDICES)}, "num_views": 2}) == []


def test_teacher_fingerprint_sees_weights_buffers_and_architecture():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU())
    fp = teacher_fingerprint(net)
    twin = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU())
    twin.load_state_dict(net.state_dict())
    assert teacher_fingerprint(twin) == fp and fp.startswith("sha256:")
    with torch.no_grad():
        twin[0].weight[0, 0] += 1e-6
    assert teacher_fingerprint(twin) != fp
    twin.load_state_dict(net.state_dict())
    twin[1].running_mean += 1  # BatchNorm statistics are part of the teacher
    assert teacher_fingerprint(twin) != fp
    other = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Tanh())  # same tensors, other function
    other.load_state_dict(net.state_dict())
    assert teacher_fingerprint(other) != fp
    assert teacher_fingerprint(net.to(torch.bfloat16)) != fp  # precision is part of the weights


def test_bytes_per_sample():
    assert Encoding("logits", "float32").bytes_per_sample(10) == 40
    assert Encoding("logits", "float16").bytes_per_sample(10) == 20
    # k values (2 bytes) + k class ids (1 byte for <= 256 classes) + the residual (2 bytes)
    assert [Encoding("topk", "float16", k).bytes_per_sample(10) for k in (1, 3, 5)] == [5, 11, 17]
    assert Encoding("topk", "bfloat16", 5).bytes_per_sample(1000) == 5 * 2 + 5 * 2 + 2
    assert math.isclose(Encoding("topk", "float32", 1).bytes_per_sample(10), 9)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_topk_log_probabilities_below_the_dtype_range_are_stored_finite(tmp_path, dtype):
    # Log-probabilities around -1e5 are -inf in fp16; the writer floors them at LOG_PROB_FLOOR (exp is 0
    # either way), so the store verifies and reads back the same distribution.
    logits = torch.tensor([[0.0, -1e5, -2e5, 5.0, -3e5, 1.0, -4e5]]).expand(len(INDICES), C)
    store = write_store(tmp_path / "s", Encoding("topk", dtype, 5), logits.unsqueeze(0).expand(VIEWS, -1, -1))
    store.verify()
    got = store.lookup(torch.from_numpy(INDICES[:2]), torch.zeros(2, dtype=torch.long))
    assert torch.isfinite(got).all()
    want = F.softmax(logits[:2], -1)
    tol = torch.finfo(TORCH_DTYPES[dtype]).eps * 8  # values rounded to the dtype, then renormalised
    torch.testing.assert_close(got.exp(), want, rtol=0, atol=tol)
