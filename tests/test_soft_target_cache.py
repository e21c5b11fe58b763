"""SoftTargetCache with real Trainers on tiny data: fixed and augmentation-consistent modes, hybrid
fallback, staleness, interrupted builds, a 2-process gloo build, and replayable augmentation; and the
cache without a Trainer (kd_lightning.cache, the fill-store workflow): the same stores, the Protocols
the DataModules satisfy, and serving's errors."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from trainers import ReleaseProcessGroup

import kd_lightning.modules
from kd_lightning.cache import (
    CacheableDataset,
    CacheDataModule,
    EpochSetting,
    LoaderOptions,
    ReplayableDataset,
    StoreIdentity,
    check_datamodule,
    fill_store,
    soft_targets,
    split_dataset,
)
from kd_lightning.callbacks import SoftTargetCache
from kd_lightning.datamodules import Digits, IndexedDataModule, RandomShift
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.modules import ClassifierModule, DistillationModule
from kd_lightning.objectives import HintonKD
from kd_lightning.store import Encoding, SoftTargetStore, StaleStoreError, StoreError, read_header
from kd_lightning.workflows.fill_store import fill_store as fill_store_workflow

SHAPE = (1, 8, 8)
TEACHER_NET = partial(SmallCNN, channels=(4,), head=16, dropout=0.5)
STUDENT_NET = partial(MLP, hidden=(16,))


def make_teacher(seed: int = 123) -> nn.Module:
    torch.manual_seed(seed)
    return TEACHER_NET(SHAPE, 4).eval()


class Recorder(L.Callback):
    """Training losses, the views each epoch served, and teacher forward passes during training."""

    def __init__(self, teacher: nn.Module | None = None) -> None:
        self.losses: list[float] = []
        self.views: dict[int, set[int]] = {}
        self.teacher_calls = 0
        self._counting = False
        if teacher is not None:
            teacher.register_forward_hook(self._count)

    def _count(self, *args) -> None:
        self.teacher_calls += self._counting

    def on_train_start(self, trainer, pl_module):
        self._counting = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if "view" in batch:
            self.views.setdefault(trainer.current_epoch, set()).update(batch["view"].tolist())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


class EpochSetter(L.Callback):
    """What the cache does for replayable data, for runs without it."""

    def on_train_epoch_start(self, trainer, pl_module):
        trainer.datamodule.set_epoch(trainer.current_epoch)


def fit(trainer_factory, dm, callbacks=(), teacher=None, epochs=3, **kwargs):
    L.seed_everything(0)
    module = DistillationModule(STUDENT_NET, 4, SHAPE, teacher=teacher, objective=HintonKD(2.0, 0.3))
    recorder = Recorder(teacher)
    trainer = trainer_factory(
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        callbacks=[recorder, *callbacks],
        **kwargs,
    )
    trainer.fit(module, dm)
    return recorder, trainer, module


def replay_dm(tiny_dm, views: int | None = 2, shift: int = 1, seed: int = 3, **kwargs) -> IndexedDataModule:
    return tiny_dm(
        train_transform=RandomShift(shift, hflip=True), augment_seed=seed, augment_views=views, **kwargs
    )


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def teacher_ckpt(tmp_path, tiny_dm, trainer_factory):
    L.seed_everything(0)
    teacher = ClassifierModule(TEACHER_NET, num_classes=4, input_shape=SHAPE)
    trainer = trainer_factory(max_steps=2, limit_val_batches=0)
    trainer.fit(teacher, tiny_dm())
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


# ---------------------------------------------------------------------------------------------
# Training from the store gives the live teacher's losses


def test_fixed_mode_matches_the_live_teacher_without_running_it(tmp_path, tiny_dm, trainer_factory):
    teacher = make_teacher()
    live, _, _ = fit(trainer_factory, tiny_dm(), teacher=teacher)
    cache = SoftTargetCache(str(tmp_path / "store"), dtype="float32", splits=["train", "val", "test"])
    cached, trainer, _ = fit(trainer_factory, tiny_dm(), [cache], teacher=teacher)

    assert set(cache.build_stats) == {"train", "val"}
    torch.testing.assert_close(cached.losses, live.losses)  # every step, from the first
    assert cached.teacher_calls == 0 and live.teacher_calls > 0
    assert float(trainer.callback_metrics["cache/hit_rate"]) == 1.0
    assert {"val/teacher_acc", "val/agreement", "val/kd_loss"} <= set(trainer.callback_metrics)

    # The test store is built when testing starts; then a student with no teacher at all still
    # reports agreement, from the stores.
    trainer.test(DistillationModule(STUDENT_NET, 4, SHAPE, teacher=teacher), tiny_dm(), verbose=False)
    assert SoftTargetStore.open(tmp_path / "store" / "test").header["dataset"]["split"] == "test"
    lonely = DistillationModule(STUDENT_NET, 4, SHAPE)
    for run in (trainer.validate, trainer.test):
        with pytest.warns(UserWarning, match="no teacher to check"):
            metrics = run(lonely, tiny_dm(), verbose=False)[0]
        assert {"teacher_acc", "agreement"} <= {k.split("/")[1] for k in metrics}

    # The next run reuses the stores as they are.
    before = files(tmp_path / "store")
    again = SoftTargetCache(str(tmp_path / "store"), dtype="float32", rebuild=False)
    rerun, _, _ = fit(trainer_factory, tiny_dm(), [again], teacher=teacher)
    assert again.build_stats == {} and files(tmp_path / "store") == before
    torch.testing.assert_close(rerun.losses, live.losses)


def test_consistent_mode_matches_the_live_teacher_on_the_same_views(tmp_path, tiny_dm, trainer_factory):
    teacher = make_teacher()
    live, _, _ = fit(trainer_factory, replay_dm(tiny_dm), [EpochSetter()], teacher=teacher)
    cache = SoftTargetCache(str(tmp_path / "store"), dtype="float32", views=2)
    cached, trainer, _ = fit(trainer_factory, replay_dm(tiny_dm), [cache], teacher=teacher)

    assert cached.views == live.views == {0: {0}, 1: {1}, 2: {0}}  # view = epoch mod 2
    assert read_header(tmp_path / "store" / "train")["num_views"] == 2
    torch.testing.assert_close(cached.losses, live.losses)
    assert cached.teacher_calls == 0 and float(trainer.callback_metrics["cache/hit_rate"]) == 1.0

    # Fixed mode on the same augmented data is a different (cheaper) objective: same first step
    # only by accident, not in general.
    fixed, _, _ = fit(
        trainer_factory, replay_dm(tiny_dm), [SoftTargetCache(str(tmp_path / "fixed"))], teacher=teacher
    )
    assert fixed.losses[0] != pytest.approx(live.losses[0], abs=1e-6)


def test_hybrid_runs_the_teacher_for_views_not_in_the_store(
    tmp_path, tiny_dm, trainer_factory, caplog, monkeypatch
):
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    teacher = make_teacher()
    live, _, _ = fit(trainer_factory, replay_dm(tiny_dm, views=None), [EpochSetter()], teacher=teacher)
    cache = SoftTargetCache(str(tmp_path / "store"), dtype="float32", views=1)
    hit_rates = []

    class HitRate(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            hit_rates.append(float(trainer.callback_metrics["cache/hit_rate"]))

    with caplog.at_level(logging.INFO):
        cached, _, _ = fit(
            trainer_factory, replay_dm(tiny_dm, views=None), [cache, HitRate()], teacher=teacher
        )
    assert cached.views == {0: {0}, 1: {1}, 2: {2}}  # a new view every epoch: only view 0 is stored
    assert hit_rates == [1.0, 0.0, 0.0]
    torch.testing.assert_close(cached.losses, live.losses)  # the fallback computed the right targets
    assert cached.teacher_calls == 4  # epochs 1 and 2, two batches each
    assert "views >= 1 run the teacher" in caplog.text
    assert "epoch 1: 0/64 training soft targets from the store" in caplog.text


def test_complete_store_needs_no_teacher_in_memory(
    tmp_path, tiny_dm, trainer_factory, teacher_ckpt, monkeypatch
):
    cache = SoftTargetCache(str(tmp_path / "store"), teacher_ckpt=str(teacher_ckpt))
    first, _, module = fit(trainer_factory, tiny_dm(), [cache])
    assert module.teacher is None and set(cache.build_stats) == {"train", "val"}

    import kd_lightning.modules

    def no_loading(path):
        raise AssertionError("the teacher was loaded although the store is complete")

    monkeypatch.setattr(kd_lightning.modules, "load_teacher", no_loading)
    again = SoftTargetCache(str(tmp_path / "store"), teacher_ckpt=str(teacher_ckpt), rebuild=False)
    second, trainer, _ = fit(trainer_factory, tiny_dm(), [again])
    assert second.losses == first.losses and again.build_stats == {}
    assert "val/agreement" in trainer.callback_metrics


# ---------------------------------------------------------------------------------------------
# Stale, interrupted and foreign stores


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ("teacher", "teacher.fingerprint"),
        ("dataset", "dataset.targets"),
        ("transform", "transform.augmentation"),
        ("seed", "transform.augment_seed"),
    ],
)
def test_stale_store_is_detected_and_kept_until_rebuilt(tmp_path, tiny_dm, trainer_factory, change, field):
    path = tmp_path / "store"
    fit(
        trainer_factory,
        replay_dm(tiny_dm),
        [SoftTargetCache(str(path), views=2, splits=["train"])],
        teacher=make_teacher(),
        epochs=1,
    )
    before = files(path)

    teacher = make_teacher(seed=7 if change == "teacher" else 123)
    dm = replay_dm(tiny_dm, shift=2 if change == "transform" else 1, seed=4 if change == "seed" else 3)
    if change == "dataset":
        dm = IndexedDataModule(
            type(dm.source)(4, seed=1),
            batch_size=32,
            eval_batch_size=64,
            val_size=64,
            train_transform=RandomShift(1, hflip=True),
            augment_seed=3,
            augment_views=2,
        )
    strict = SoftTargetCache(str(path), views=2, splits=["train"], rebuild=False)
    with pytest.raises(
        StaleStoreError, match=rf"store '{path / 'train'}' is stale: .*{field}: store has"
    ) as err:
        fit(trainer_factory, dm, [strict], teacher=teacher, epochs=1)
    assert any(d.startswith(field) for d in err.value.differences)
    assert "rebuild" in str(err.value)
    assert files(path) == before  # refusing touched nothing

    rebuilt = SoftTargetCache(str(path), views=2, splits=["train"])
    with pytest.warns(UserWarning, match=rf"rebuilding '{path / 'train'}', which is stale: .*{field}"):
        fit(trainer_factory, dm, [rebuilt], teacher=teacher, epochs=1)
    assert set(rebuilt.build_stats) == {"train"} and files(path) != before
    assert [p.name for p in path.iterdir()] == ["train"]  # the old store is gone, no leftovers


class PowerCut(nn.Module):
    """A teacher whose machine dies during the third batch of a build."""

    num_classes = 4

    def __init__(self) -> None:
        super().__init__()
        self.net = make_teacher()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("power cut")
        return self.net(x)


def test_interrupted_build_is_never_used(tmp_path, tiny_dm, trainer_factory):
    path = tmp_path / "store"
    with pytest.raises(RuntimeError, match="power cut"):
        fit(trainer_factory, tiny_dm(), [SoftTargetCache(str(path), batch_size=16)], teacher=PowerCut())
    assert not path.exists() or list(path.iterdir()) == []  # no store, not even a hidden partial one

    # A directory that claims to be a store but was never completed is rebuilt, or refused.
    good = SoftTargetCache(str(path), batch_size=16, splits=["train"])
    fit(trainer_factory, tiny_dm(), [good], teacher=make_teacher(), epochs=1)
    header = path / "train" / "header.json"
    header.write_text(header.read_text().replace('"complete": true', '"complete": false'))
    with pytest.raises(StaleStoreError, match="incomplete"):
        fit(
            trainer_factory,
            tiny_dm(),
            [SoftTargetCache(str(path), splits=["train"], rebuild=False)],
            teacher=make_teacher(),
            epochs=1,
        )
    rebuilt = SoftTargetCache(str(path), splits=["train"])
    fit(trainer_factory, tiny_dm(), [rebuilt], teacher=make_teacher(), epochs=1)
    assert "train" in rebuilt.build_stats and read_header(path / "train")["complete"] is True


def test_bad_input_is_named(tmp_path, tiny_dm, trainer_factory):
    teacher = make_teacher()
    with pytest.raises(ValueError, match=r"top_k`=5 exceeds the number of classes of the data \(4\)"):
        fit(
            trainer_factory,
            tiny_dm(),
            [SoftTargetCache(str(tmp_path / "s"), kind="topk", top_k=5)],
            teacher=teacher,
        )
    with pytest.raises(ValueError, match="augment_seed"):
        fit(trainer_factory, tiny_dm(), [SoftTargetCache(str(tmp_path / "s"), views=2)], teacher=teacher)
    with pytest.raises(RuntimeError, match="no teacher"):
        fit(trainer_factory, tiny_dm(), [SoftTargetCache(str(tmp_path / "s"))])
    for bad, match in [
        (dict(kind="soft"), "kind"),
        (dict(dtype="int8"), "dtype"),
        (dict(kind="topk"), "top_k"),
        (dict(views=0), "views"),
        (dict(splits=["training"]), "splits"),
        (dict(batch_size=0), "batch_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            SoftTargetCache(str(tmp_path / "s"), **bad)

    # Not a store: refused whatever `rebuild` says, and left alone.
    foreign = tmp_path / "data" / "train"
    foreign.mkdir(parents=True)
    (foreign / "images.npy").write_bytes(b"precious")
    with pytest.raises(StoreError, match=rf"`path`: '{foreign}' is not a soft-target store"):
        fit(
            trainer_factory,
            tiny_dm(),
            [SoftTargetCache(str(tmp_path / "data"), splits=["train"])],
            teacher=teacher,
        )
    assert (foreign / "images.npy").read_bytes() == b"precious"

    # Another dataset's store: refused whatever `rebuild` says, and left alone.
    path = tmp_path / "store"
    fit(trainer_factory, tiny_dm(), [SoftTargetCache(str(path), splits=["train"])], teacher=teacher, epochs=1)
    before = files(path)
    other = tiny_dm()
    other.source = type("Other", (type(other.source),), {"name": "other"})(4)
    with pytest.raises(
        StoreError, match=r"store '.*train' belongs to another dataset.*dataset.dataset: store has 'tiny'"
    ):
        fit(trainer_factory, other, [SoftTargetCache(str(path), splits=["train"])], teacher=teacher, epochs=1)
    assert files(path) == before

    # A truncated array file: named, kept with rebuild=False, replaced with rebuild=True.
    logits = path / "train" / "logits.bin"
    logits.write_bytes(logits.read_bytes()[:100])
    with pytest.raises(StaleStoreError, match=r"'logits.bin' is 100 bytes, expected \d+ .*truncated"):
        fit(
            trainer_factory,
            tiny_dm(),
            [SoftTargetCache(str(path), splits=["train"], rebuild=False)],
            teacher=teacher,
            epochs=1,
        )
    assert logits.stat().st_size == 100
    fit(trainer_factory, tiny_dm(), [SoftTargetCache(str(path), splits=["train"])], teacher=teacher, epochs=1)
    store = SoftTargetStore.open(path / "train")
    assert store.lookup(store.indices[:2]).shape == (2, 4)
    with pytest.raises(IndexError, match=rf"store '{path / 'train'}': sample index 0 is not in the store"):
        store.lookup(torch.tensor([0]))  # a validation sample


def test_resumed_run_serves_the_views_of_its_epoch(tmp_path, tiny_dm, trainer_factory):
    teacher = make_teacher()
    cache = SoftTargetCache(str(tmp_path / "store"), views=2, splits=["train"])
    _, trainer, module = fit(trainer_factory, replay_dm(tiny_dm, views=3), [cache], teacher=teacher, epochs=2)
    assert cache.state_dict()["epoch"] == 2
    trainer.save_checkpoint(tmp_path / "last.ckpt")

    resumed = SoftTargetCache(str(tmp_path / "store"), views=2, splits=["train"])
    recorder = Recorder()
    trainer = trainer_factory(
        max_epochs=4, limit_train_batches=2, limit_val_batches=1, callbacks=[recorder, resumed]
    )
    trainer.fit(module, replay_dm(tiny_dm, views=3), ckpt_path=tmp_path / "last.ckpt", weights_only=False)
    # Epoch 2 serves view 2, from its first (prefetched) batch on; view 2 is not stored: hybrid.
    assert recorder.views == {2: {2}, 3: {0}}
    assert resumed.build_stats == {}


# ---------------------------------------------------------------------------------------------
# Distributed build


def ddp_build(path: Path, devices: int, strategy: str) -> None:
    """Build train and val stores of Digits (consistent mode, 2 views) with ``devices`` processes."""
    torch.manual_seed(0)
    teacher = SmallCNN(SHAPE, 10, channels=(4,), head=16)
    module = DistillationModule(partial(MLP, hidden=(8,)), 10, SHAPE, teacher=teacher)
    dm = IndexedDataModule(
        Digits(), batch_size=64, val_size=200, train_transform=RandomShift(1, hflip=True), augment_seed=5
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=path,
        callbacks=[
            SoftTargetCache(str(path / "store"), views=2, batch_size=100, dtype="bfloat16"),
            ReleaseProcessGroup(),
        ],
    )
    trainer.fit(module, dm)


@pytest.mark.slow  # two spawned processes import torch and Lightning: about 20 s on 2 busy cores
def test_two_process_build_equals_one_process_build_bit_for_bit(tmp_path):
    ddp_build(tmp_path / "one", 1, "auto")
    ddp_build(tmp_path / "two", 2, "ddp_spawn")
    one, two = tmp_path / "one" / "store", tmp_path / "two" / "store"
    for split in ("train", "val"):
        a, b = read_header(one / split), read_header(two / split)
        assert b["build"]["world_size"] == 2 and a["build"]["world_size"] == 1
        assert {k: v for k, v in a.items() if k != "build"} == {k: v for k, v in b.items() if k != "build"}
        for name in a["arrays"]:
            assert (one / split / name).read_bytes() == (two / split / name).read_bytes(), (split, name)
    assert sorted(p.name for p in two.iterdir()) == ["train", "val"]


# ---------------------------------------------------------------------------------------------
# Replayable augmentation


def test_replayable_augmentation(tiny_dm):
    dm = replay_dm(tiny_dm, views=3, shift=2)
    dm.setup("fit")
    ds = dm.train_set
    j = int(ds.indices[5])
    first = ds[5]
    assert first["view"] == 0 and first["index"] == j
    torch.manual_seed(99)  # the global RNG plays no part
    assert torch.equal(ds[5]["input"], first["input"]) and torch.equal(ds.input_of(j, 0), first["input"])
    dm.set_epoch(4)
    item = ds[5]
    assert item["view"] == 1 and torch.equal(item["input"], ds.input_of(j, 1))
    views = torch.stack([ds.input_of(int(i), v) for i in ds.indices[:20] for v in range(3)]).view(20, 3, -1)
    assert not all(torch.equal(views[i, 0], views[i, 1]) for i in range(20))  # views differ
    assert torch.equal(ds.input_of(j), ds.source[j][0])  # no view: the un-augmented input

    rnd = replay_dm(tiny_dm, views=3, view_schedule="random")
    rnd.setup("fit")
    drawn = [[rnd.train_set.view_of(int(i), e) for e in range(6)] for i in rnd.train_set.indices[:20]]
    assert {v for row in drawn for v in row} == {0, 1, 2} and len({tuple(r) for r in drawn}) > 1
    assert drawn == [[rnd.train_set.view_of(int(i), e) for e in range(6)] for i in rnd.train_set.indices[:20]]

    fresh = replay_dm(tiny_dm, views=None)
    fresh.setup("fit")
    fresh.set_epoch(7)
    assert fresh.train_set[0]["view"] == 7

    plain = tiny_dm(train_transform=RandomShift(1))
    plain.setup("fit")
    assert set(plain.train_set[0]) == {"input", "target", "index"}  # the contract, unchanged


def test_persistent_workers_follow_the_epoch(tiny_dm):
    dm = replay_dm(tiny_dm, views=4, num_workers=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    for epoch in (0, 1, 2):
        dm.set_epoch(epoch)
        for batch in loader:
            assert set(batch["view"].tolist()) == {epoch}
            j = int(batch["index"][0])
            assert torch.equal(batch["input"][0], dm.train_set.input_of(j, epoch))


def test_replay_arguments_are_checked(tiny_dm):
    with pytest.raises(ValueError, match="augment_seed"):
        tiny_dm(augment_views=2)
    with pytest.raises(ValueError, match="augment_views"):
        tiny_dm(augment_seed=0, view_schedule="random")
    with pytest.raises(ValueError, match="augment_views"):
        tiny_dm(augment_seed=0, augment_views=0)
    with pytest.raises(ValueError, match="view_schedule"):
        tiny_dm(augment_seed=0, view_schedule="shuffle")


# ---------------------------------------------------------------------------------------------
# Without a Trainer: kd_lightning.cache and the fill-store workflow


def same_store(a: Path, b: Path) -> None:
    """The same identity (the build's circumstances apart) and the same bytes in every array."""
    ha, hb = read_header(a), read_header(b)
    assert {k: v for k, v in ha.items() if k != "build"} == {k: v for k, v in hb.items() if k != "build"}
    for name in ha["arrays"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("mode", ["fixed", "views"])
def test_the_workflow_fills_the_stores_the_callback_builds(
    tmp_path, tiny_dm, trainer_factory, teacher_ckpt, monkeypatch, mode
):
    make = partial(replay_dm, tiny_dm) if mode == "views" else tiny_dm
    options = {"views": 2} if mode == "views" else {}
    splits = ["train", "val", "test"]
    built = SoftTargetCache(
        str(tmp_path / "callback"), teacher_ckpt=str(teacher_ckpt), splits=splits, **options
    )
    fit(trainer_factory, make(), [built], epochs=1)
    assert set(built.build_stats) == {"train", "val"}
    # The test store is built when testing starts.
    trainer_factory(callbacks=[built]).test(DistillationModule(STUDENT_NET, 4, SHAPE), make(), verbose=False)

    filled = fill_store_workflow(
        str(teacher_ckpt), make(), str(tmp_path / "workflow"), splits=splits, accelerator="cpu", **options
    )
    assert [(f.split, f.built, f.views) for f in filled] == [
        ("train", True, 2 if mode == "views" else 1),
        ("val", True, 1),
        ("test", True, 1),
    ]
    for split in splits:
        same_store(tmp_path / "callback" / split, tmp_path / "workflow" / split)
    assert read_header(tmp_path / "workflow" / "train")["build"]["precision"] == "32-true"

    # Filled once: the workflow keeps them, and a fit with the callback never loads the teacher.
    again = fill_store_workflow(
        str(teacher_ckpt), make(), str(tmp_path / "workflow"), splits=splits, **options
    )
    assert [f.built for f in again] == [False, False, False]

    def no_loading(path):
        raise AssertionError("the teacher was loaded although the stores are complete")

    monkeypatch.setattr(kd_lightning.modules, "load_teacher", no_loading)
    reused = SoftTargetCache(
        str(tmp_path / "workflow"), teacher_ckpt=str(teacher_ckpt), rebuild=False, **options
    )
    fit(trainer_factory, make(), [reused], epochs=1)
    assert reused.build_stats == {}


def test_the_workflow_refuses_a_stale_store_without_rebuild(tmp_path, tiny_dm, teacher_ckpt):
    path = tmp_path / "stores"
    fill_store_workflow(str(teacher_ckpt), tiny_dm(), str(path), splits=["train"], dtype="float32")
    before = (path / "train" / "logits.bin").read_bytes()
    with pytest.raises(
        StaleStoreError, match=r"is stale: .*encoding\.dtype: store has 'float32'.*`rebuild` is False"
    ):
        fill_store_workflow(str(teacher_ckpt), tiny_dm(), str(path), splits=["train"], rebuild=False)
    assert (path / "train" / "logits.bin").read_bytes() == before
    (rebuilt,) = fill_store_workflow(str(teacher_ckpt), tiny_dm(), str(path), splits=["train"])
    assert rebuilt.built and rebuilt.reason.startswith("is stale")
    for bad, match in [
        (dict(splits=["training"]), "splits"),
        (dict(kind="topk", top_k=5), r"top_k`=5 exceeds the number of classes of the data \(4\)"),
        (dict(views=2), "augment_seed"),
        (dict(precision="16-mixed", accelerator="cpu"), "bf16-mixed"),
        (dict(batch_size=0), "batch_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            fill_store_workflow(str(teacher_ckpt), tiny_dm(), str(tmp_path / "bad"), **bad)


def test_fill_store_needs_no_trainer(tmp_path, tiny_dm):
    dm = tiny_dm()
    dm.setup("fit")
    teacher = make_teacher()
    dataset = split_dataset(dm, "val")
    identity = StoreIdentity.of(
        dataset, dm.fingerprint("val"), num_classes=4, encoding=Encoding("topk", "float32", 2)
    )
    store = fill_store(teacher, dataset, tmp_path / "val", identity, batch_size=10, progress=False)
    assert SoftTargetStore.open(tmp_path / "val").header["build"]["world_size"] == 1
    batch = {"index": dataset.indices[[3, 0]]}
    logits, hits = soft_targets(store, batch, "cpu")
    expected = torch.stack([dataset.input_of(int(i)) for i in batch["index"]])
    top2 = teacher(expected).log_softmax(-1).topk(2).indices
    assert hits == 2 and torch.equal(logits.topk(2).indices, top2)


def test_the_datamodules_satisfy_the_protocols(tiny_dm):
    dm = replay_dm(tiny_dm)
    assert isinstance(dm, CacheDataModule) and isinstance(dm, EpochSetting) and isinstance(dm, LoaderOptions)
    dm.setup("fit")
    assert isinstance(dm.train_set, ReplayableDataset) and isinstance(dm.val_set, CacheableDataset)
    assert check_datamodule(dm) is dm and split_dataset(dm, "train") is dm.train_set
    with pytest.raises(ValueError, match=r"no usable `test_set` for split 'test'.*got NoneType"):
        split_dataset(dm, "test")  # not set up for testing
    with pytest.raises(ValueError, match="`split` must be one of"):
        split_dataset(dm, "training")
    with pytest.raises(
        ValueError,
        match=r"needs the data from a DataModule with `fingerprint\(split\)`.*got LightningDataModule",
    ):
        check_datamodule(L.LightningDataModule())


def test_serving_errors_name_the_batch_and_the_store(tmp_path, tiny_dm):
    dm = replay_dm(tiny_dm)
    dm.setup("fit")
    teacher = make_teacher()
    identity = StoreIdentity.of(
        dm.train_set, dm.fingerprint("train"), num_classes=4, encoding=Encoding("logits", "float32"), views=1
    )
    store = fill_store(teacher, dm.train_set, tmp_path / "train", identity, progress=False)
    index = dm.train_set.indices[:3]
    with pytest.raises(ValueError, match=r"dicts with an 'index' entry.*got list"):
        soft_targets(store, [index], "cpu")
    with pytest.raises(ValueError, match=r"holds 1 augmentation view.*carry no 'view'"):
        soft_targets(store, {"index": index}, "cpu", by_view=True)
    batch = {"index": index, "view": torch.tensor([0, 1, 0]), "input": torch.zeros(3, *SHAPE)}
    with pytest.raises(ValueError, match=r"views >= 1 are not in the store .*no `fallback`"):
        soft_targets(store, batch, "cpu", by_view=True)
    # Hybrid: the stored view 0, and the fallback for view 1 (never another view's targets).
    logits, hits = soft_targets(
        store, batch, "cpu", by_view=True, fallback=lambda x: torch.full((len(x), 4), 7.0)
    )
    assert hits == 2 and torch.equal(logits[1], torch.full((4,), 7.0))
    torch.testing.assert_close(logits[[0, 2]], store.lookup(index[[0, 2]], torch.tensor([0, 0])))
    with pytest.raises(ValueError, match=r"`views`=2 is augmentation-consistent.*got a IndexedDataset"):
        plain = tiny_dm()
        plain.setup("fit")
        StoreIdentity.of(plain.train_set, {}, num_classes=4, encoding=Encoding(), views=2)


def test_the_workflow_is_a_command_line_signature():
    """``kd fill-store`` is built by jsonargparse from the signature: every argument typed, data by class_path."""
    from jsonargparse import ArgumentParser

    from kd_lightning.datamodules import Digits, IndexedDataModule

    parser = ArgumentParser()
    parser.add_function_arguments(fill_store_workflow, fail_untyped=True, as_positional=False)
    argv = ["--teacher_ckpt=t.ckpt", "--out_dir=stores", "--splits=[train, test]", "--views=2"]
    argv += [
        "--data=kd_lightning.datamodules.IndexedDataModule",
        "--data.source=kd_lightning.datamodules.Digits",
    ]
    arguments = parser.instantiate_classes(parser.parse_args(argv)).as_dict()
    assert isinstance(arguments["data"], IndexedDataModule) and isinstance(arguments["data"].source, Digits)
    assert (arguments["splits"], arguments["views"], arguments["kind"]) == (["train", "test"], 2, "logits")
