"""Faults injected into soft-target stores on purpose: each is detected, and nothing of the user's is lost.

Corrupt bytes (a flipped byte, a NaN, truncation, a removed completeness marker) and a changed teacher or
data are rebuilt with a warning naming the fault, or, with ``rebuild=False``, stop the run with an error
naming the store, the array and the first bad row, touching nothing. A build killed with SIGKILL leaves a
temporary directory that the next build removes; a user's file inside a store, a read-only directory and a
file where a store directory should be stop the run before the teacher runs, and nothing is deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from kd_lightning.callbacks import SoftTargetCache
from kd_lightning.datamodules import IndexedDataModule
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.modules import DistillationModule
from kd_lightning.objectives import HintonKD
from kd_lightning.store import (
    HEADER,
    CorruptStoreError,
    Encoding,
    SoftTargetStore,
    StaleStoreError,
    StoreError,
    StoreWriter,
    file_sha256,
    remove_leftovers,
)

ROOT = Path(__file__).resolve().parents[1]
SHAPE, CLASSES = (1, 8, 8), 4
NOBODY = 65534  # the unprivileged user of Linux distributions


def make_teacher(seed: int = 123) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(SHAPE, CLASSES, channels=(4,), head=16).eval()


def counted(teacher: nn.Module) -> nn.Module:
    """``teacher`` counting its forward passes on batches in ``teacher.calls`` (its fingerprint is unchanged).

    The one-sample shape probe of DistillationModule's constructor does not count.
    """
    teacher.calls = 0

    def count(module, inputs, output) -> None:
        teacher.calls += inputs[0].shape[0] > 1

    teacher.register_forward_hook(count)
    return teacher


def fit(trainer_factory, dm, path: Path, teacher: nn.Module, **cache) -> SoftTargetCache:
    """One tiny distillation step whose soft targets come from the store of ``path/train``."""
    L.seed_everything(0)
    callback = SoftTargetCache(str(path), splits=["train"], batch_size=64, **cache)
    module = DistillationModule(
        partial(MLP, hidden=(8,)), CLASSES, SHAPE, teacher=teacher, objective=HintonKD(2.0)
    )
    trainer = trainer_factory(max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=[callback])
    trainer.fit(module, dm)
    return callback


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def poke(file: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes in place: the file keeps its size."""
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(data)


# ---------------------------------------------------------------------------------------------
# Faults in the bytes, the teacher and the data


def flip_byte(store: Path) -> str:
    # The low byte of an fp16 logit: the value stays finite, only the checksum can tell.
    offset = (5 * CLASSES + 1) * 2
    byte = (store / "logits.bin").read_bytes()[offset]
    poke(store / "logits.bin", offset, bytes([byte ^ 0x01]))
    return r"is corrupt: .*array 'logits\.bin' has checksum sha256:\w+, the header records"


def write_nan(store: Path) -> str:
    poke(store / "logits.bin", (7 * CLASSES + 2) * 2, np.array([np.nan], "<f2").tobytes())
    sample = int(np.fromfile(store / "index.bin", "<i8")[7])
    return (
        r"is corrupt: .*array 'logits\.bin' holds non-finite soft targets: 1 of its 192 rows, the first at "
        rf"view 0, row 7 \(sample index {sample}\), value nan"
    )


def truncate(store: Path) -> str:
    data = (store / "logits.bin").read_bytes()
    (store / "logits.bin").write_bytes(data[:-6])
    return rf"cannot be used: .*'logits\.bin' is {len(data) - 6} bytes, expected {len(data)} bytes.*truncated"


def remove_marker(store: Path) -> str:
    header = json.loads((store / HEADER).read_text())
    del header["complete"]
    (store / HEADER).write_text(json.dumps(header))
    return "is incomplete"


FAULTS = {"flipped byte": flip_byte, "NaN": write_nan, "truncated": truncate, "no marker": remove_marker}


@pytest.mark.parametrize("fault", [*FAULTS, "teacher", "data"])
def test_fault_is_detected_refused_and_rebuilt(tmp_path, tiny_dm, trainer_factory, fault):
    path, store = tmp_path / "cache", tmp_path / "cache" / "train"
    fit(trainer_factory, tiny_dm(), path, make_teacher(), dtype="float16")
    original = files(store)
    teacher, dm = make_teacher(), tiny_dm()
    if fault == "teacher":
        teacher, match = make_teacher(seed=7), r"is stale: .*teacher\.fingerprint: store has"
    elif fault == "data":
        dm = IndexedDataModule(type(dm.source)(CLASSES, seed=1), batch_size=32, val_size=64)
        match = r"is stale: .*dataset\.targets: store has"
    else:
        match = FAULTS[fault](store)
    before = files(store)

    teacher = counted(teacher)
    with pytest.raises(StaleStoreError, match=re.escape(f"store '{store}' ")) as err:
        fit(trainer_factory, dm, path, teacher, dtype="float16", rebuild=False)
    assert teacher.calls == 0  # refused before the teacher ran
    assert "`rebuild` is False" in str(err.value)
    assert re.search(match, str(err.value)), str(err.value)
    assert files(store) == before  # refusing touched nothing

    with pytest.warns(UserWarning, match=rf"rebuilding '{re.escape(str(store))}', which {match}"):
        fit(trainer_factory, dm, path, teacher, dtype="float16")
    assert teacher.calls > 0
    SoftTargetStore.open(store)  # verifies
    rebuilt = files(store)
    assert rebuilt.keys() == original.keys()
    if fault in FAULTS:  # the same teacher on the same data: the arrays as they were before the fault
        assert all(rebuilt[name] == original[name] for name in original if name != HEADER)
    else:
        assert rebuilt["logits.bin"] != original["logits.bin"]
    assert [p.name for p in path.iterdir()] == ["train"]  # no temporary or old directory left


def test_non_finite_values_in_every_format_are_refused_at_open(tmp_path):
    """Store level: NaN or inf in any value array is named with its view, row and sample index."""
    indices = np.array([9, 2, 7, 4])
    logits = 3 * torch.randn(2, 4, CLASSES, generator=torch.Generator().manual_seed(0))
    cases = [
        (
            Encoding("logits", "bfloat16"),
            "logits.bin",
            np.array([np.inf], "<f4").view("<u2")[1:],
        ),  # bf16 +inf
        (Encoding("logits", "float32"), "logits.bin", np.array([-np.inf], "<f4")),
        (Encoding("topk", "float16", 2), "values.bin", np.array([np.nan], "<f2")),
        (
            Encoding("topk", "float16", 2),
            "log_residual.bin",
            np.array([-np.inf], "<f2"),
        ),  # k < C: not allowed
        (Encoding("topk", "float32", CLASSES), "log_residual.bin", np.array([np.nan], "<f4")),
    ]
    for n, (encoding, name, bad) in enumerate(cases):
        path = tmp_path / f"s{n}"
        writer = StoreWriter.create(path, encoding, CLASSES, indices, 2, {})
        for view in range(2):
            writer.write(view, 0, logits[view])
        writer.commit()
        SoftTargetStore.open(path)  # valid, including log_residual = -inf when k == C
        spec = json.loads((path / HEADER).read_text())["arrays"][name]
        item = np.dtype(spec["dtype"]).itemsize
        row_items = spec["shape"][-1] if len(spec["shape"]) == 3 else 1
        poke(path / name, (1 * 4 + 2) * row_items * item, bad.tobytes())  # view 1, row 2: sample 7
        with pytest.raises(
            CorruptStoreError, match=rf"'{name}' holds non-finite.*view 1, row 2 \(sample index 7\)"
        ) as err:
            SoftTargetStore.open(path)
        assert err.value.array == name and err.value.row == (1, 2, 7)
        assert str(path) in str(err.value) and "checksum differs" in str(err.value)
        SoftTargetStore.open(path, verify=False)  # cheap open, where the caller has just checked the bytes

    # A NaN the header's checksum agrees with (a store written so): still refused, and said so.
    path = tmp_path / "s0"
    header = json.loads((path / HEADER).read_text())
    header["arrays"]["logits.bin"]["sha256"] = file_sha256(path / "logits.bin")
    (path / HEADER).write_text(json.dumps(header))
    with pytest.raises(CorruptStoreError, match="checksum is the one the header records"):
        SoftTargetStore.open(path)


def test_a_non_finite_teacher_never_makes_a_store(tmp_path, tiny_dm, trainer_factory):
    indices = np.array([9, 2, 7, 4])
    writer = StoreWriter.create(tmp_path / "s", Encoding("logits", "float16"), 3, indices, 1, {})
    with pytest.raises(StoreError, match=r"not finite at view 0, row 2 \(sample index 7\): value nan"):
        writer.write(0, 0, torch.tensor([[0.0, 1, 2], [0, 1, 2], [0, float("nan"), 2], [0, 1, 2]]))
    with pytest.raises(StoreError, match=r"overflow float16 at view 0, row 1 \(sample index 2\): value inf"):
        writer.write(0, 0, torch.tensor([[0.0, 1, 2], [7e4, 1, 2]]))  # finite in fp32, inf in fp16
    # Rows another process wrote straight to disk are checked at commit: nothing is published.
    writer.write(0, 0, torch.zeros(4, 3))
    writer.close()
    poke(writer.tmp / "logits.bin", (3 * 3) * 2, np.array([np.inf], "<f2").tobytes())
    with pytest.raises(CorruptStoreError, match=r"view 0, row 3 \(sample index 4\)"):
        writer.commit()
    assert list(tmp_path.iterdir()) == []

    # Through the callback: the run stops naming the row, and leaves no store.
    class Diverged(nn.Module):
        num_classes = CLASSES

        def __init__(self) -> None:
            super().__init__()
            self.net = make_teacher()

        def forward(self, x):
            out = self.net(x)
            out[3, 1] = float("nan")
            return out

    teacher = Diverged()
    with pytest.raises(
        StoreError, match=r"teacher's logits are not finite at view 0, row 3 \(sample index \d+\)"
    ):
        fit(trainer_factory, tiny_dm(), tmp_path / "cache", teacher)
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Leftovers of killed builds

KILLED_BUILD = textwrap.dedent(
    """
    import sys, time
    from functools import partial
    sys.path[:0] = [{root!r}, {tests!r}]
    import lightning as L, torch
    from torch import nn
    from conftest import TinySource
    from kd_lightning.callbacks import SoftTargetCache
    from kd_lightning.datamodules import IndexedDataModule
    from kd_lightning.models import MLP, SmallCNN
    from kd_lightning.modules import DistillationModule

    class Slow(nn.Module):  # a teacher slow enough to be killed mid-build
        def __init__(self):
            super().__init__()
            torch.manual_seed(123)
            self.net = SmallCNN((1, 8, 8), 4, channels=(4,), head=16).eval()
        def forward(self, x):
            time.sleep(0.5)
            return self.net(x)

    module = DistillationModule(partial(MLP, hidden=(8,)), 4, (1, 8, 8), teacher=Slow())
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir={path!r},
                        callbacks=[SoftTargetCache({path!r}, splits=["train"], batch_size=8)])
    trainer.fit(module, IndexedDataModule(TinySource(4), batch_size=32, eval_batch_size=64, val_size=64))
    """
)


@pytest.mark.slow  # a subprocess imports torch and Lightning (about 5 s)
def test_build_killed_mid_way_is_cleaned_up_by_the_next(tmp_path, tiny_dm, trainer_factory):
    path = tmp_path / "cache"
    script = KILLED_BUILD.format(root=str(ROOT), tests=str(ROOT / "tests"), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not list(path.glob(".train.tmp-*/index.bin")):  # the build has started writing
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.05)
        time.sleep(0.7)  # a batch or two written
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    (tmp,) = path.glob(".train.tmp-*")
    assert json.loads((tmp / HEADER).read_text())["complete"] is False
    assert not (path / "train").exists()

    # Beside it: a replaced store whose deletion was killed (ours), and two directories of that name
    # pattern that are not ours (no header; a header of another format), each holding a user's file.
    fit(trainer_factory, tiny_dm(), tmp_path / "other", make_teacher())
    shutil.copytree(tmp_path / "other" / "train", path / ".train.old-0123456789ab")
    for name, header in ((".train.tmp-mine", None), (".train.old-mine", {"format": "something/else"})):
        (path / name).mkdir()
        (path / name / "notes.txt").write_text("mine")
        if header is not None:
            (path / name / HEADER).write_text(json.dumps(header))

    with pytest.warns(
        UserWarning, match=r"\.train\.(tmp|old)-mine' is named like a leftover build.*left as it is"
    ):
        fit(trainer_factory, tiny_dm(), path, make_teacher())
    assert sorted(p.name for p in path.iterdir()) == [".train.old-mine", ".train.tmp-mine", "train"]
    assert (path / ".train.tmp-mine" / "notes.txt").read_text() == "mine"
    assert (path / ".train.old-mine" / "notes.txt").read_text() == "mine"
    assert files(path / "train") == files(tmp_path / "other" / "train") | {
        HEADER: (path / "train" / HEADER).read_bytes()
    }  # the same teacher on the same data: the arrays of the store the killed build would have made


def test_a_live_build_and_files_the_header_does_not_list_are_left_alone(tmp_path):
    path = tmp_path / "train"
    live = StoreWriter.create(path, Encoding("logits", "float32"), 3, np.arange(4), 1, {})
    # Another process on this host (our parent) is "building"; a dead one left a user's file inside.
    header = json.loads((live.tmp / HEADER).read_text())
    header["build"]["pid"] = os.getppid()
    (live.tmp / HEADER).write_text(json.dumps(header))
    with pytest.warns(UserWarning, match="still running: left as it is"):
        dead = StoreWriter.create(path, Encoding("logits", "float32"), 3, np.arange(4), 1, {}, token="dead")
    (dead.tmp / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning) as record:
        assert remove_leftovers(path) == []
    messages = " ".join(str(w.message) for w in record)
    assert "still running" in messages and "left ['notes.txt'], which the store did not write" in messages
    assert live.tmp.is_dir() and [p.name for p in dead.tmp.iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------------------------------------
# Files of the user's, read-only directories, files in the way: refused before the teacher runs


def test_a_users_file_in_a_stale_store_is_never_deleted(tmp_path, tiny_dm, trainer_factory):
    path, store = tmp_path / "cache", tmp_path / "cache" / "train"
    fit(trainer_factory, tiny_dm(), path, make_teacher())
    (store / "notes.txt").write_text("mine")
    before = files(store)
    teacher = counted(make_teacher(seed=7))  # the store is stale
    with pytest.raises(
        StoreError,
        match=re.escape(f"refusing to replace the soft-target store '{store}': it holds 'notes.txt'")
        + ".*"
        + re.escape(f"Move '{store / 'notes.txt'}' out"),
    ):
        fit(trainer_factory, tiny_dm(), path, teacher)
    assert teacher.calls == 0 and files(store) == before

    # Also when the file appears during the build: the commit refuses, and deletes nothing.
    writer = StoreWriter.create(store, Encoding("logits", "float16"), CLASSES, np.arange(3), 1, {})
    writer.write(0, 0, torch.zeros(3, CLASSES))
    (store / "late.txt").write_text("mine too")
    with pytest.raises(StoreError, match="it holds 'late.txt', 'notes.txt'"):
        writer.commit()
    assert files(store) == {**before, "late.txt": b"mine too"} and sorted(p.name for p in path.iterdir()) == [
        "train"
    ]


def test_a_file_where_a_directory_should_be(tmp_path, tiny_dm, trainer_factory):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "train").write_text("mine")
    (tmp_path / "file").write_text("mine too")
    for path, named in (
        (tmp_path / "cache", tmp_path / "cache" / "train"),
        (tmp_path / "file", tmp_path / "file"),
    ):
        teacher = counted(make_teacher())
        with pytest.raises(
            StoreError, match=rf"'{re.escape(str(named))}'.*(a file|File exists|Not a directory)"
        ):
            fit(trainer_factory, tiny_dm(), path, teacher)
        assert teacher.calls == 0
    assert (tmp_path / "cache" / "train").read_text() == "mine" and (
        tmp_path / "file"
    ).read_text() == "mine too"


def as_unprivileged(fn):
    """Run ``fn()`` where writes to directories not granted to the process truly fail: returns its error.

    As root (which chmod does not stop) in a forked child that drops to user ``nobody``; otherwise here.
    """
    if os.geteuid() != 0:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - the error is the result
            return f"{type(err).__name__}: {err}"
        return None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave, whatever happens
        code = 0
        try:
            os.close(read)
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            except OSError as err:
                raise _CannotDrop(str(err)) from err
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
            message = ""
        except BaseException as err:  # noqa: BLE001 - the error is the result
            message = f"{type(err).__name__}: {err}"
        try:
            os.write(write, message.encode())
        except BaseException:  # noqa: BLE001
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        message = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    if message.startswith(_CannotDrop.__name__):
        pytest.skip(
            f"LOUD SKIP: running as root, and cannot drop to user {NOBODY} to test read-only directories: {message}"
        )
    return message or None


class _CannotDrop(Exception):
    """Root without the capability to change user (a restricted container)."""


@pytest.fixture
def shared_dir():
    """A directory under /tmp that user ``nobody`` can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="kd-faults-"))
    path.chmod(0o755)
    yield path
    for p in [path, *path.rglob("*")]:
        if p.is_dir():
            p.chmod(0o755)
    shutil.rmtree(path)


def test_read_only_directories_are_named_before_the_teacher_runs(shared_dir, tiny_dm, trainer_factory):
    # 1. The directory of the stores is read-only, or (2.) missing under a read-only one.
    parent, ro = shared_dir / "parent", shared_dir / "ro"
    parent.mkdir()
    ro.mkdir()
    # 3. A stale store in a writable parent, the store directory itself read-only: it cannot be replaced.
    writable = shared_dir / "writable"
    fit(trainer_factory, tiny_dm(), writable, make_teacher())
    store = writable / "train"
    before = files(store)
    writable.chmod(0o777)
    if os.geteuid() != 0:
        for directory in (parent, ro, store):
            directory.chmod(0o555)
        try:
            (parent / "probe").touch()
        except OSError:
            pass
        else:
            pytest.skip("LOUD SKIP: this filesystem lets a non-root user write into a 0o555 directory")
    teacher = counted(make_teacher(seed=7))
    for path, named in ((ro, ro), (parent / "cache", parent / "cache"), (writable, store)):
        dm = tiny_dm()

        def run(path=path, dm=dm):
            L.seed_everything(0)
            callback = SoftTargetCache(str(path), splits=["train"])
            module = DistillationModule(partial(MLP, hidden=(8,)), CLASSES, SHAPE, teacher=teacher)
            trainer = trainer_factory(
                max_epochs=1,
                limit_train_batches=1,
                limit_val_batches=0,
                callbacks=[callback],
                default_root_dir=shared_dir,
            )
            trainer.fit(module, dm)
            assert teacher.calls == 0, "the teacher ran"

        error = as_unprivileged(run)
        assert error is not None and error.startswith("StoreError"), error
        assert f"'{named}'" in error and ("cannot create" in error or "cannot write in" in error), error
        assert "Permission denied" in error and "choose another `path`" in error, error
    assert files(store) == before and list(parent.iterdir()) == list(ro.iterdir()) == []
