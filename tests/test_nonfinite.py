"""A non-finite training loss stops the run, naming the step and the batch's samples, before the model
it would have made is saved: real Trainers, a real ModelCheckpoint."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset
from trainers import quiet_trainer

from kd_lightning.models import MLP
from kd_lightning.modules import ClassifierModule, DistillationModule, NonFiniteLossError

NUM, CLASSES, BATCH = 32, 4, 4  # 8 batches an epoch, in order (no shuffling): batch b holds 4b..4b+3
POISONED = 21  # batch 5 of every epoch


class PoisonableData(Dataset):
    """Items of the batch contract with ``teacher_logits`` (as the soft-target cache supplies them).

    While ``poison`` names a field, sample ``POISONED`` carries NaN there; ``poison_from_epoch`` is the
    first epoch it does.
    """

    def __init__(self, poison: str, poison_from_epoch: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(NUM, 6, generator=g)
        self.y = torch.randint(0, CLASSES, (NUM,), generator=g)
        self.logits = torch.randn(NUM, CLASSES, generator=g)
        self.poison, self.poison_from_epoch, self.epoch = poison, poison_from_epoch, 0

    def __len__(self) -> int:
        return NUM

    def __getitem__(self, i: int) -> dict:
        item = {"input": self.x[i].clone(), "target": int(self.y[i]), "index": i}
        item["teacher_logits"] = self.logits[i].clone()
        if i == POISONED and self.epoch >= self.poison_from_epoch:
            item[self.poison][0] = math.nan
        return item


class Watch(L.Callback):
    """Tells the data the epoch, and records, at the start of every training batch, its indices and
    what the checkpoint directory holds (names and bytes), to compare with after the failure."""

    def __init__(self, data: PoisonableData, directory: Path) -> None:
        self.data, self.directory = data, directory
        self.batches: list[tuple[int, list[int]]] = []
        self.files: dict[str, bytes] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.data.epoch = trainer.current_epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append((trainer.global_step, batch["index"].tolist()))
        self.files = {p.name: p.read_bytes() for p in sorted(self.directory.glob("*"))}


def _fit_until_failure(tmp_path, module: L.LightningModule, poison: str, poison_from_epoch: int):
    data = PoisonableData(poison, poison_from_epoch)
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    watch = Watch(data, directory)
    # Every epoch and every 2 steps, plus last.ckpt: every chance to save the model after the failure.
    checkpoint = ModelCheckpoint(
        dirpath=directory,
        filename="final",
        enable_version_counter=False,
        save_last=True,
        every_n_train_steps=2,
    )
    trainer = quiet_trainer(
        tmp_path, max_epochs=3, enable_checkpointing=True, callbacks=[watch, checkpoint], limit_val_batches=0
    )
    with pytest.raises(NonFiniteLossError) as failure:
        trainer.fit(module, DataLoader(data, batch_size=BATCH, shuffle=False))
    return str(failure.value), watch, directory


def _student() -> DistillationModule:
    torch.manual_seed(0)
    return DistillationModule(partial(MLP, hidden=(8,)), CLASSES, (6,))


@pytest.mark.parametrize("poison", ["teacher_logits", "input"])
def test_nan_in_the_second_epoch_stops_naming_step_and_indices(tmp_path, poison):
    """NaN soft targets (a corrupt store) or a NaN input, from epoch 1: the loss of batch 5 of that
    epoch, global step 8 + 5 = 13, is NaN."""
    message, watch, directory = _fit_until_failure(tmp_path, _student(), poison, poison_from_epoch=1)
    step, indices = watch.batches[-1]
    assert (step, indices) == (13, [20, 21, 22, 23])
    assert f"at global step {step} (epoch 1, batch 5)" in message
    assert f"on the samples with index {indices}" in message and "(nan)" in message

    # Nothing was written after the failing step began: same files, same bytes.
    after = {p.name: p.read_bytes() for p in sorted(directory.glob("*"))}
    assert after == watch.files and set(after) == {"final.ckpt", "last.ckpt"}
    # And what is there is a model from before the bad value: finite, at the step before.
    saved = torch.load(directory / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 12
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_classifier_stops_at_the_first_step(tmp_path):
    """The guard is in the shared base: a ClassifierModule stops too, here on its very first step,
    before any checkpoint exists."""
    torch.manual_seed(0)
    model = ClassifierModule(partial(MLP, hidden=(8,)), CLASSES, (6,))
    data = PoisonableData("input", poison_from_epoch=0)
    data.x[0] = math.inf  # batch 0 as well as sample POISONED
    with pytest.raises(
        NonFiniteLossError,
        match=r"at global step 0 \(epoch 0, batch 0\), on the samples with index \[0, 1, 2, 3\]",
    ):
        quiet_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, limit_val_batches=0).fit(
            model, DataLoader(data, batch_size=BATCH)
        )
    assert not list(tmp_path.rglob("*.ckpt"))
    assert all(torch.isfinite(p).all() for p in model.parameters())  # no step was taken


def test_finite_run_is_untouched(tmp_path):
    """Without poison the same run trains to the end."""
    data = PoisonableData("input", poison_from_epoch=99)
    model = _student()
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    trainer.fit(model, DataLoader(data, batch_size=BATCH))
    assert trainer.global_step == 16
