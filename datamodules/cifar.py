"""CIFAR-10/100 sources read from the python-pickle batches (torchvision's on-disk layout)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from kd_lightning.datamodules.base import ClassificationSource


def _unpickle(path: Path) -> dict[str, Any]:
    """Load one CIFAR pickle with ``str`` keys, whichever Python wrote it.

    The official files are Python 2 pickles (``latin1`` is what numpy needs to read their arrays);
    files written by Python 3 with ``bytes`` keys (``b"data"``) are accepted too.
    """
    with open(path, "rb") as f:
        obj = pickle.load(f, encoding="latin1")
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}.")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _names(values: list[Any]) -> list[str]:
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values]


class CIFARSource(ClassificationSource):
    """Base for the CIFAR pickles; subclasses name the folder, files, label key and statistics.

    Args:
        data_dir: the directory holding torchvision's extracted folder (``cifar-10-batches-py`` or
            ``cifar-100-python``), or that folder itself. ``None`` means ``./data``.
        download: allow torchvision to download and extract the archive into ``data_dir`` (or
            ``./data``) when the files are missing.
    """

    input_shape = (3, 32, 32)
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    torchvision_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __init__(self, data_dir: str | None = None, download: bool = False) -> None:
        self.data_dir = data_dir
        self.download = download
        self._class_names: list[str] | None = None

    @property
    def root(self) -> Path:
        return Path(self.data_dir) if self.data_dir else Path("data")

    def _search_dirs(self) -> list[Path]:
        return [self.root / self.folder, self.root]

    def _find(self) -> Path | None:
        """The directory holding every train and test batch file, if any."""
        for d in self._search_dirs():
            if all((d / name).is_file() for name in self.train_files + self.test_files):
                return d
        return None

    def prepare(self) -> None:
        if self._find() is not None:
            return
        if not self.download:
            looked = ", ".join(str(d) for d in self._search_dirs())
            raise FileNotFoundError(
                f"{type(self).__name__}: no {self.name} pickle batches ({', '.join(self.train_files + self.test_files)}) "
                f"for data_dir={self.data_dir!r}; looked in: {looked}. Pass `download: true` to fetch them "
                "with torchvision, or point `data_dir` at the directory that holds "
                f"{self.folder}/."
            )
        import torchvision

        getattr(torchvision.datasets, self.torchvision_name)(str(self.root), train=True, download=True)
        getattr(torchvision.datasets, self.torchvision_name)(str(self.root), train=False, download=True)

    def _directory(self) -> Path:
        d = self._find()
        if d is None:
            self.prepare()
            d = self._find()
            assert d is not None  # prepare() raised or downloaded
        return d

    @property
    def class_names(self) -> list[str]:
        # From the meta file, read once; class indices as strings until the files are there.
        if self._class_names is None:
            d = self._find()
            meta = d / self.meta_file if d is not None else None
            if meta is None or not meta.is_file():
                return [str(i) for i in range(self.num_classes)]
            names = _names(_unpickle(meta).get(self.names_key, []))
            if len(names) != self.num_classes:
                raise ValueError(
                    f"{type(self).__name__}: {meta} lists {len(names)} `{self.names_key}`, expected {self.num_classes}."
                )
            self._class_names = names
        return self._class_names

    def load(self, train: bool) -> tuple[Dataset, Tensor]:
        d = self._directory()
        images, labels = [], []
        for name in self.train_files if train else self.test_files:
            batch = _unpickle(d / name)
            missing = [k for k in ("data", self.label_key) if k not in batch]
            if missing:
                raise ValueError(
                    f"{type(self).__name__}: {d / name} lacks key(s) {missing}; it has {sorted(batch)}."
                )
            data = np.asarray(batch["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch[self.label_key]):
                raise ValueError(
                    f"{type(self).__name__}: expected an N x 3072 `data` array with N labels in {d / name}, "
                    f"got data {data.shape} and {len(batch[self.label_key])} labels."
                )
            images.append(data)
            labels.append(np.asarray(batch[self.label_key], dtype=np.int64))
        # Rows are 1024 red, 1024 green, then 1024 blue values of a 32 x 32 image: already C x H x W.
        x = torch.from_numpy(np.concatenate(images)).view(-1, 3, 32, 32).float().div_(255)
        x.sub_(torch.tensor(self.mean).view(1, 3, 1, 1)).div_(torch.tensor(self.std).view(1, 3, 1, 1))
        y = torch.from_numpy(np.concatenate(labels))
        if y.min() < 0 or y.max() >= self.num_classes:
            raise ValueError(f"{type(self).__name__}: labels outside 0..{self.num_classes - 1} in {d}.")
        return TensorDataset(x, y), y


class CIFAR10(CIFARSource):
    """CIFAR-10 (Krizhevsky 2009): 50k/10k 32x32 colour images of 10 classes."""

    name = "cifar10"
    num_classes = 10
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file = "batches.meta"
    label_key = "labels"
    names_key = "label_names"
    torchvision_name = "CIFAR10"
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class CIFAR100(CIFARSource):
    """CIFAR-100 (Krizhevsky 2009): 50k/10k 32x32 colour images of 100 fine classes."""

    name = "cifar100"
    num_classes = 100
    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    meta_file = "meta"
    label_key = "fine_labels"
    names_key = "fine_label_names"
    torchvision_name = "CIFAR100"
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
