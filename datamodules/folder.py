"""Image-folder source (ImageNet layout): ``root/<train_dir>/<class>/*.jpg`` and ``root/<test_dir>/<class>/...``.

Images are decoded lazily, one file per item, so the dataset need not fit in memory; use DataLoader
workers (``num_workers``) to decode in parallel.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from kd_lightning.datamodules.base import ClassificationSource


class ImageFolder(ClassificationSource):
    """Labelled images in one folder per class, resized and centre-cropped to ``image_size``.

    Both splits get the same deterministic preprocessing (resize the short side to ``resize``,
    centre-crop ``image_size``, normalise); training augmentation is the data module's
    ``train_transform``, applied to the resulting tensors.

    Args:
        root: directory holding the two split directories.
        train_dir: name of the training split under ``root``; its class folders define the classes.
        test_dir: name of the test split under ``root`` (ImageNet's ``val``); must hold the same
            class folders.
        image_size: side of the square crop.
        resize: short side to resize to before cropping; ``None`` means ``round(image_size * 8 / 7)``
            (256 for 224, the usual ImageNet ratio).
        mean: per-channel mean subtracted after scaling to ``[0, 1]`` (ImageNet's by default).
        std: per-channel standard deviation divided by (ImageNet's by default).
    """

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        test_dir: str = "val",
        image_size: int = 224,
        resize: int | None = None,
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
    ) -> None:
        if not (isinstance(image_size, int) and image_size > 0):
            raise ValueError(f"`image_size` must be a positive integer, got {image_size!r}.")
        resize = round(image_size * 8 / 7) if resize is None else resize
        if not (isinstance(resize, int) and resize >= image_size):
            raise ValueError(f"`resize` must be an integer >= image_size={image_size}, got {resize!r}.")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(
                f"`mean` and `std` must hold 3 values each, std positive; got mean={mean}, std={std}."
            )
        self.root = root
        self.train_dir = train_dir
        self.test_dir = test_dir
        self.image_size = image_size
        self.resize = resize
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.name = Path(root).name or "image_folder"
        self.input_shape = (3, image_size, image_size)
        self._classes: list[str] | None = None

    def _split_dir(self, train: bool) -> Path:
        d = Path(self.root) / (self.train_dir if train else self.test_dir)
        if not d.is_dir():
            arg = "train_dir" if train else "test_dir"
            raise FileNotFoundError(
                f"ImageFolder: no {'training' if train else 'test'} directory {d} "
                f"(root={self.root!r}, {arg}={d.name!r}); expected one sub-folder of images per class."
            )
        return d

    @staticmethod
    def _class_folders(d: Path) -> list[str]:
        classes = sorted(e.name for e in d.iterdir() if e.is_dir())
        if not classes:
            raise FileNotFoundError(
                f"ImageFolder: no class folders in {d}; expected {d}/<class>/<image files>."
            )
        return classes

    @property
    def class_names(self) -> list[str]:
        # Scanning ImageNet's 1000 folders is cheap, but do it once.
        if self._classes is None:
            self._classes = self._class_folders(self._split_dir(True))
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _check_test_classes(self) -> None:
        test_classes = self._class_folders(self._split_dir(False))
        if test_classes != self.class_names:
            only_train = sorted(set(self.class_names) - set(test_classes))
            only_test = sorted(set(test_classes) - set(self.class_names))
            raise ValueError(
                f"ImageFolder: the class folders of {self._split_dir(False)} must match those of "
                f"{self._split_dir(True)}, or labels would differ between splits. Only in "
                f"{self.train_dir!r}: {only_train}; only in {self.test_dir!r}: {only_test}. "
                f"{self.train_dir!r} has {self.class_names}; {self.test_dir!r} has {test_classes}."
            )

    def prepare(self) -> None:
        self._check_test_classes()

    def load(self, train: bool) -> tuple[Dataset, Tensor]:
        from torchvision import datasets, transforms

        if not train:
            self._check_test_classes()
        preprocess = transforms.Compose(
            [
                transforms.Resize(self.resize),
                transforms.CenterCrop(self.image_size),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )
        dataset = datasets.ImageFolder(str(self._split_dir(train)), transform=preprocess)
        return dataset, torch.tensor(dataset.targets, dtype=torch.int64)
