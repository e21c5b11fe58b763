"""The soft-target cache without a Trainer (kd_lightning.cache, the `fill-store` workflow): the stores it
fills are the callback's, its contracts are Protocols the DataModules satisfy, and its errors name what
is wrong."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

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
from kd_lightning.datamodules import RandomShift
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.modules import ClassifierModule, DistillationModule
from kd_lightning.store import Encoding, SoftTargetStore, StaleStoreError, read_header
from kd_lightning.workflows.fill_store import fill_store as fill_store_workflow

SHAPE = (1, 8, 8)
TEACHER_NET = partial(SmallCNN, channels=(4,), head=16)


@pytest.fixture
def teacher_ckpt(tmp_path, tiny_dm, trainer_factory) -> Path:
    L.seed_everything(0)
    teacher = ClassifierModule(TEACHER_NET, num_classes=4, input_shape=SHAPE)
    trainer = trainer_factory(max_steps=2, limit_val_batches=0)
    trainer.fit(teacher, tiny_dm())
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


def replay_dm(tiny_dm):
    return tiny_dm(train_transform=RandomShift(1, hflip=True), augment_seed=3, augment_views=2)


def callback_build(trainer_factory, dm, path: Path, teacher_ckpt: Path, **cache) -> SoftTargetCache:
    L.seed_everything(0)
    callback = SoftTargetCache(str(path), teacher_ckpt=str(teacher_ckpt), **cache)
    module = DistillationModule(partial(MLP, hidden=(8,)), 4, SHAPE)
    trainer = trainer_factory(max_epochs=1, limit_train_batches=1, limit_val_batches=1, callbacks=[callback])
    trainer.fit(module, dm)
    return callback


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
    built = callback_build(
        trainer_factory, make(), tmp_path / "callback", teacher_ckpt, splits=splits, **options
    )
    assert set(built.build_stats) == {"train", "val"}
    # The test store is built when testing starts.
    trainer_factory(callbacks=[built]).test(
        DistillationModule(partial(MLP, hidden=(8,)), 4, SHAPE), make(), verbose=False
    )

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
    reused = callback_build(
        trainer_factory, make(), tmp_path / "workflow", teacher_ckpt, rebuild=False, **options
    )
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
    torch.manual_seed(0)
    teacher = TEACHER_NET(SHAPE, 4).eval()
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
    torch.manual_seed(0)
    teacher = TEACHER_NET(SHAPE, 4).eval()
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
