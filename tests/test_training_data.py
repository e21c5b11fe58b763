"""Variants of the training split: extra training inputs (ExtraTraining) and classes left out (omit_classes)."""

from __future__ import annotations

import pytest
import torch
from conftest import TinySource

from kd_lightning.datamodules import ExtraTraining, IndexedDataModule

DM = {"batch_size": 32, "eval_batch_size": 64, "val_size": 64}


def test_extra_training_appends_to_the_training_file_only():
    base, extra = TinySource(4, n_train=40, n_test=10), TinySource(4, n_train=30, n_test=20, seed=1)
    both = ExtraTraining(base, extra)
    data, y = both.load(True)
    assert len(data) == len(y) == 70
    assert torch.equal(data.tensors[0][40:], extra.load(True)[0].tensors[0])
    assert torch.equal(both.load(False)[1], base.load(False)[1])
    # Base's samples keep their positions (the batch contract's `index`).
    assert torch.equal(data.tensors[0][:40], base.load(True)[0].tensors[0])
    assert (both.name, both.num_classes, both.class_names) == ("tiny+tiny", 4, base.class_names)


def test_extra_training_refuses_a_different_task():
    with pytest.raises(ValueError, match="`extra` must have base's 4 classes"):
        ExtraTraining(TinySource(4), TinySource(3))


def test_omit_class_drops_it_from_the_transfer_set_only():
    dm = IndexedDataModule(TinySource(4), omit_classes=(2,), **DM)
    dm.setup()
    assert (dm.train_set.targets != 2).all() and (dm.val_set.targets == 2).any()
    assert (dm.test_set.targets == 2).any()
    # Every other training sample stays, at its position in the training file.
    full = IndexedDataModule(TinySource(4), **DM)
    full.setup("fit")
    assert torch.equal(dm.train_set.indices, full.train_set.indices[full.train_set.targets != 2])
    assert torch.equal(dm.val_set.indices, full.val_set.indices)


def test_omit_classes_applies_after_train_fraction():
    dm = IndexedDataModule(TinySource(4), omit_classes=(0, 3), train_fraction=0.5, **DM)
    dm.setup("fit")
    part = IndexedDataModule(TinySource(4), train_fraction=0.5, **DM)
    part.setup("fit")
    keep = (part.train_set.targets != 0) & (part.train_set.targets != 3)
    assert torch.equal(dm.train_set.indices, part.train_set.indices[keep])


@pytest.mark.parametrize("omit", [(4,), (-1,), (0, 1, 2, 3), (1.0,)])
def test_omit_classes_must_be_class_ids_that_leave_a_class(omit):
    with pytest.raises(ValueError, match=r"`omit_classes` must be class ids in \[0, 4\)"):
        IndexedDataModule(TinySource(4), omit_classes=omit, **DM)
