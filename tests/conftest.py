"""Shared fixtures: a tiny in-memory dataset with a learnable planted rule, and quiet Trainers."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch.utils.data import TensorDataset
from trainers import quiet_trainer

from kd_lightning.datamodules.base import ClassificationSource, IndexedDataModule

os.environ.setdefault("WANDB_MODE", "offline")
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
# Tiny models gain nothing from intra-op threads, and on a busy machine waiting threads cost ~30x.
torch.set_num_threads(1)


class TinySource(ClassificationSource):
    """``num_classes`` classes of 1x8x8 inputs: a class prototype plus noise, so a few steps learn something."""

    name = "tiny"
    input_shape = (1, 8, 8)

    def __init__(self, num_classes: int = 4, n_train: int = 256, n_test: int = 64, seed: int = 0) -> None:
        self.num_classes = num_classes
        self.class_names = [f"c{i}" for i in range(num_classes)]
        g = torch.Generator().manual_seed(seed)
        self._protos = torch.randn(num_classes, *self.input_shape, generator=g)
        self._sizes = {True: n_train, False: n_test}
        self._seed = seed

    def load(self, train: bool):
        g = torch.Generator().manual_seed(self._seed + (1 if train else 2))
        n = self._sizes[train]
        y = torch.randint(0, self.num_classes, (n,), generator=g)
        x = self._protos[y] + 0.8 * torch.randn(n, *self.input_shape, generator=g)
        return TensorDataset(x, y), y


@pytest.fixture
def tiny_dm():
    def make(num_classes: int = 4, **kwargs) -> IndexedDataModule:
        kwargs = {"batch_size": 32, "eval_batch_size": 64, "val_size": 64, **kwargs}
        return IndexedDataModule(TinySource(num_classes), **kwargs)

    return make


@pytest.fixture
def trainer_factory(tmp_path):
    return lambda **kwargs: quiet_trainer(tmp_path, **kwargs)
