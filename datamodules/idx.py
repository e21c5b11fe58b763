"""MNIST-family sources read from IDX files: the Debian package, a ``data_dir``, or torchvision's download."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from kd_lightning.datamodules.base import ClassificationSource

_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type codes (third byte of the magic number) to numpy dtypes, big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array.

    Raises:
        ValueError: if the header is not IDX or the payload does not match its declared shape.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4]!r}).")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ValueError(
            f"{path}: IDX header declares shape {dims} ({expected} bytes) but holds {len(raw) - offset}."
        )
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


class IDXSource(ClassificationSource):
    """Base for 28x28 grey-scale IDX datasets; subclasses name the files' homes and the statistics.

    Args:
        data_dir: a directory holding the four IDX files (``.gz`` or not), directly or in
            torchvision's ``<Name>/raw/`` layout. ``None`` looks in the system directory, then
            ``./data``.
        download: allow torchvision to download the files into ``data_dir`` (or ``./data``).
    """

    num_classes = 10
    input_shape = (1, 28, 28)
    system_dir: str | None = None
    torchvision_name: str
    mean: float
    std: float

    def __init__(self, data_dir: str | None = None, download: bool = False) -> None:
        self.data_dir = data_dir
        self.download = download

    def _search_dirs(self) -> list[Path]:
        roots = [Path(self.data_dir)] if self.data_dir else [Path("data")]
        dirs = [d for r in roots for d in (r, r / self.torchvision_name / "raw")]
        if self.data_dir is None and self.system_dir:
            dirs.insert(0, Path(self.system_dir))
        return dirs

    def _find(self, train: bool) -> tuple[Path, Path] | None:
        for d in self._search_dirs():
            found = []
            for stem in _FILES[train]:
                hits = [d / (stem + ext) for ext in ("", ".gz") if (d / (stem + ext)).is_file()]
                if not hits:
                    break
                found.append(hits[0])
            if len(found) == 2:
                return found[0], found[1]
        return None

    def available(self) -> bool:
        """Whether both splits' files are on disk (nothing is downloaded)."""
        return self._find(True) is not None and self._find(False) is not None

    def prepare(self) -> None:
        if self.available():
            return
        if not self.download:
            looked = ", ".join(str(d) for d in self._search_dirs())
            raise FileNotFoundError(
                f"{type(self).__name__}: no {self.name} IDX files (train-images-idx3-ubyte[.gz] and friends) "
                f"for data_dir={self.data_dir!r}; looked in: {looked}. Pass `download: true` to fetch them "
                "with torchvision, or point `data_dir` at the files."
                + (" On Debian: apt-get install dataset-fashion-mnist." if self.system_dir else "")
            )
        import torchvision

        getattr(torchvision.datasets, self.torchvision_name)(
            self.data_dir or "data", train=True, download=True
        )
        getattr(torchvision.datasets, self.torchvision_name)(
            self.data_dir or "data", train=False, download=True
        )

    def load(self, train: bool) -> tuple[Dataset, Tensor]:
        paths = self._find(train)
        if paths is None:
            self.prepare()
            paths = self._find(train)
            assert paths is not None  # prepare() raised or downloaded
        images, labels = (read_idx(p) for p in paths)
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise ValueError(
                f"{type(self).__name__}: expected N x 28 x 28 images with N labels, got images "
                f"{images.shape} and labels {labels.shape} from {paths[0].parent}."
            )
        x = torch.from_numpy(images.copy()).float().div_(255).sub_(self.mean).div_(self.std).unsqueeze(1)
        y = torch.from_numpy(labels.astype(np.int64))
        if y.min() < 0 or y.max() >= self.num_classes:
            raise ValueError(
                f"{type(self).__name__}: labels outside 0..{self.num_classes - 1} in {paths[1]}."
            )
        return TensorDataset(x, y), y


class FashionMNIST(IDXSource):
    """Fashion-MNIST (Xiao et al. 2017): 60k/10k 28x28 grey images of 10 clothing classes."""

    name = "fashion_mnist"
    system_dir = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
    torchvision_name = "FashionMNIST"
    mean, std = 0.2860, 0.3530
    class_names = [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ]


class MNIST(IDXSource):
    """MNIST handwritten digits: 60k/10k 28x28 grey images."""

    name = "mnist"
    torchvision_name = "MNIST"
    mean, std = 0.1307, 0.3081
    class_names = [str(i) for i in range(10)]
