"""Soft targets gathered where the batch is made (SoftTargetCache(gather_in="loader"), StoreFeed) against
the training process's gather (gather_in="main"): the same values bit for bit, in fixed, augmentation-
consistent and hybrid modes, with and without loader workers; no store read in the training step; rows
the store lacks; pickling into workers; precision plugins; the specialist DataModule."""

from __future__ import annotations

import pickle
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import HalfPrecision
from torch import nn

from kd_lightning.cache import (
    FED,
    FeedSetting,
    SoftTargets,
    StoreFeed,
    StoreIdentity,
    fill_missing,
    fill_store,
    gather,
)
from kd_lightning.callbacks import SoftTargetCache
from kd_lightning.datamodules import RandomShift, SpecialistDataModule
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.modules import DistillationModule
from kd_lightning.objectives import HintonKD
from kd_lightning.optim import OneCycle
from kd_lightning.store import Encoding, SoftTargetStore, StoreError, StoreWriter

# A loader-mode batch that reaches the training process without its soft targets is a failure here.
pytestmark = pytest.mark.filterwarnings("error:.*came without the soft targets")

SHAPE = (1, 8, 8)
STUDENT_NET = partial(MLP, hidden=(16,))


def make_teacher() -> nn.Module:
    torch.manual_seed(123)
    return SmallCNN(SHAPE, 4, channels=(4,), head=16, dropout=0.5).eval()


class Served(L.Callback):
    """After the cache (later in the list): each training batch's index, view and soft targets, the losses,
    and the store lookups made between a batch's start and its end (placed first, see ``window``)."""

    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((batch["index"].clone(), batch.get("view"), batch["teacher_logits"].clone()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


class StepWindow(L.Callback):
    """First in the list: counts ``SoftTargetStore.lookup`` calls made while a training batch runs (from its
    first ``on_train_batch_start`` hook to its ``on_train_batch_end``)."""

    def __init__(self, monkeypatch) -> None:
        self.inside = False
        self.lookups_in_step = self.lookups = 0
        self.in_step_by_epoch: dict[int, int] = {}
        lookup = SoftTargetStore.lookup

        def counted(store, *args, **kwargs):
            self.lookups += 1
            self.lookups_in_step += self.inside
            if self.inside:
                self.in_step_by_epoch[self.epoch] = self.in_step_by_epoch.get(self.epoch, 0) + 1
            return lookup(store, *args, **kwargs)

        monkeypatch.setattr(SoftTargetStore, "lookup", counted)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.inside, self.epoch = True, trainer.current_epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.inside = False


def run(trainer_factory, dm, path, gather_in, views=None, teacher=None, extra=(), epochs=2):
    L.seed_everything(0)
    # A schedule makes Lightning build the training loader before fitting starts (to count its steps),
    # before the cache sets the feed: the loader must apply it all the same.
    module = DistillationModule(
        STUDENT_NET, 4, SHAPE, teacher=teacher, objective=HintonKD(2.0, 0.3), lr_schedule=OneCycle()
    )
    cache = SoftTargetCache(
        str(path), dtype="float16", views=views, gather_in=gather_in, splits=["train", "val"]
    )
    served = Served()
    trainer = trainer_factory(
        max_epochs=epochs, limit_train_batches=3, limit_val_batches=1, callbacks=[*extra, cache, served]
    )
    trainer.fit(module, dm)
    return served, cache, trainer


def same_batches(a: Served, b: Served) -> None:
    assert len(a.batches) == len(b.batches) > 0
    for (ia, va, la), (ib, vb, lb) in zip(a.batches, b.batches, strict=True):
        assert torch.equal(ia, ib) and (va is None) == (vb is None) and (va is None or torch.equal(va, vb))
        assert la.dtype == torch.float32 and torch.equal(la, lb)  # exact: the same gather, another place
    assert a.losses == b.losses


@pytest.mark.parametrize("mode", ["fixed", "views", "hybrid"])
def test_loader_and_main_paths_serve_identical_soft_targets(tmp_path, tiny_dm, trainer_factory, mode):
    views, make = {
        "fixed": (None, tiny_dm),
        "views": (
            2,
            lambda: tiny_dm(train_transform=RandomShift(1, hflip=True), augment_seed=3, augment_views=2),
        ),
        # the data serves a new view every epoch, the store holds view 0: epoch 1 runs the teacher
        "hybrid": (1, lambda: tiny_dm(train_transform=RandomShift(1, hflip=True), augment_seed=3)),
    }[mode]
    teacher = make_teacher()
    main, _, _ = run(trainer_factory, make(), tmp_path / "store", "main", views, teacher)
    loader, cache, trainer = run(trainer_factory, make(), tmp_path / "store", "loader", views, teacher)
    same_batches(main, loader)
    assert cache.build_stats == {}  # the second run reused the store of the first
    hit_rate = float(trainer.callback_metrics["cache/hit_rate"])
    assert hit_rate == (0.0 if mode == "hybrid" else 1.0)  # the last epoch's


def test_the_training_step_reads_no_store_in_loader_mode(tmp_path, tiny_dm, trainer_factory, monkeypatch):
    teacher = make_teacher()
    counts = {}
    for gather_in in ("main", "loader"):
        window = StepWindow(monkeypatch)
        _, cache, _ = run(
            trainer_factory, tiny_dm(), tmp_path / "store", gather_in, teacher=teacher, extra=[window]
        )
        counts[gather_in] = (window.lookups, window.lookups_in_step)
        monkeypatch.undo()
    # 2 epochs x 3 training batches, + validation batches (sanity check and one per epoch)
    assert counts["main"][1] == 6 and counts["main"][0] >= 6
    assert counts["loader"] == (counts["main"][0], 0)  # the same gathers, none inside a step


def test_worker_processes_gather_the_soft_targets(tmp_path, tiny_dm, trainer_factory, monkeypatch):
    teacher = make_teacher()
    make = partial(tiny_dm, train_transform=RandomShift(1, hflip=True), augment_seed=3, augment_views=2)
    # Workers draw their base seed from the global generator: the same loader settings, the same order.
    main, _, _ = run(trainer_factory, make(num_workers=2), tmp_path / "store", "main", 2, teacher)
    window = StepWindow(monkeypatch)  # counts the lookups of this process only
    loader, _, _ = run(
        trainer_factory, make(num_workers=2), tmp_path / "store", "loader", 2, teacher, extra=[window]
    )
    same_batches(main, loader)
    # The workers started before fitting (the schedule's step count) and made the first epoch's batches
    # before the feed was set: the training process gathered those. From then on, only the workers did.
    assert window.in_step_by_epoch.get(0, 0) <= 3 and window.in_step_by_epoch.get(1, 0) == 0
    assert window.lookups == window.lookups_in_step  # no gather in this process outside a step


def one_view_store(path, rows: int = 6, classes: int = 3) -> SoftTargetStore:
    writer = StoreWriter.create(
        path, Encoding("logits", "float32"), classes, torch.arange(10, 10 + rows).numpy(), 1, {}
    )
    writer.write(0, 0, torch.arange(rows * classes, dtype=torch.float32).view(rows, classes))
    return writer.commit({})


def test_rows_the_store_lacks_are_flagged_and_computed_live(tmp_path):
    store = one_view_store(tmp_path / "train")
    batch = {"index": torch.tensor([11, 12, 13]), "view": torch.tensor([0, 1, 0]), "input": torch.ones(3, 2)}
    fed = StoreFeed(store, by_view=True)(dict(batch))[FED]
    assert fed.missing.tolist() == [False, True, False] and fed.logits[1].isnan().all()
    assert torch.equal(fed.logits[[0, 2]], store.lookup(torch.tensor([11, 13])))
    hits = fill_missing(fed.logits, fed.missing, batch["input"], lambda x: torch.full((len(x), 3), -1.0), "s")
    assert hits == 2 and torch.equal(fed.logits[1], torch.full((3,), -1.0))
    with pytest.raises(ValueError, match="views that are not in the store s and no `fallback`"):
        fill_missing(fed.logits, fed.missing, batch["input"], None, "s")
    # Every view stored: nothing flagged, no NaN.
    logits, missing = gather(store, {**batch, "view": torch.zeros(3, dtype=torch.long)}, by_view=True)
    assert missing is None and torch.equal(logits, store.lookup(batch["index"]))


def test_a_feed_reopens_its_store_by_path_and_refuses_a_changed_one(tmp_path):
    store = one_view_store(tmp_path / "train")
    feed = StoreFeed(store)
    copy = pickle.loads(pickle.dumps(feed))
    assert copy._store is None  # a memory map is not pickled (it would be copied whole)
    assert torch.equal(
        copy({"index": torch.tensor([15, 10])})[FED].logits, store.lookup(torch.tensor([15, 10]))
    )
    stale = pickle.loads(pickle.dumps(feed))
    one_view_store(tmp_path / "train", rows=4)  # rebuilt by someone else in between
    with pytest.raises(StoreError, match="changed after this run checked it"):
        stale({"index": torch.tensor([10])})


def test_soft_targets_stay_fp32_under_a_converting_precision(tmp_path):
    """`bf16-true` converts a batch's floating tensors; the fed soft targets are not one of them."""
    fed = SoftTargets(torch.tensor([[0.1, 1 / 3]]), None)
    batch = HalfPrecision("bf16-true").convert_input({"input": torch.ones(1, 2), FED: fed})
    assert batch["input"].dtype == torch.bfloat16 and batch[FED].logits.dtype == torch.float32
    moved = L.LightningModule().transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert torch.equal(moved[FED].logits, fed.logits)


def test_the_specialist_loader_carries_the_feed(tmp_path, tiny_dm):
    dm = SpecialistDataModule(tiny_dm().source, classes=[0], oversample=0.5, batch_size=16, val_size=64)
    assert isinstance(dm, FeedSetting)
    dm.setup("fit")
    identity = StoreIdentity.of(
        dm.train_set, dm.fingerprint("train"), num_classes=4, encoding=Encoding("logits", "float32")
    )
    store = fill_store(make_teacher(), dm.train_set, tmp_path / "train", identity, progress=False)
    dm.set_feed("train", StoreFeed(store))
    batch = next(iter(dm.train_dataloader()))
    assert torch.equal(batch[FED].logits, store.lookup(batch["index"]))
    dm.set_feed("train", None)
    assert FED not in next(iter(dm.train_dataloader()))
    with pytest.raises(ValueError, match="`split` must be one of"):
        dm.set_feed("training", None)


def test_gather_in_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"`gather_in` must be one of \('loader', 'main'\), got 'gpu'"):
        SoftTargetCache(str(tmp_path), gather_in="gpu")
