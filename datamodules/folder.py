"""Image-folder source (ImageNet layout): ``root/train/<class>/*.jpg``, ``root/val/<class>/...`` and
optionally ``root/test/<class>/...``.

Each folder is the split its name says. Without ``val/``, validation is carved out of ``train/``
(the DataModule's ``val_size``); without ``test/``, the test split is ``val/`` (ImageNet's custom: its
test labels are not public), and with neither, the carved validation split. The layout is checked
when the source is built, before any logger or W&B run starts.

Images are decoded lazily, one file per item, so the dataset need not fit in memory; use DataLoader
workers (``num_workers``) to decode in parallel.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2

from kd_lightning.datamodules.base import ClassificationSource

# torchvision's default loader (PIL) reads these (torchvision.datasets.folder.IMG_EXTENSIONS).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolder(ClassificationSource):
    """Labelled images in one folder per class, split by folder: ``train/``, ``val/``, ``test/``.

    Items are the decoded RGB pictures; :attr:`preprocess` (used for validation, test, and for training
    unless the DataModule's ``train_transform`` is a torchvision pipeline) resizes the short side to
    ``resize``, centre-crops ``image_size`` and normalises. A torchvision ``train_transform`` (e.g.
    ``RandomResizedCrop(image_size)``, ``RandomHorizontalFlip``, ``ToImage``, ``ToDtype``, ``Normalize``)
    takes the picture itself.

    Args:
        root: directory holding the split directories.
        train_dir: name of the training split under ``root``; its class folders define the classes.
        val_dir: name of the validation split under ``root``; when that folder is absent, validation is
            carved out of the training split (the DataModule's ``val_size``).
        test_dir: name of the test split under ``root``; when that folder is absent, the test split is
            the validation split (``val_dir``, or the carved one).
        image_size: side of the square inputs (the networks are built for ``(3, image_size, image_size)``).
        resize: short side to resize to before cropping; ``None`` means ``round(image_size * 8 / 7)``
            (256 for 224, the usual ImageNet ratio).
        mean: per-channel mean subtracted after scaling to ``[0, 1]`` (ImageNet's by default).
        std: per-channel standard deviation divided by (ImageNet's by default).

    Raises:
        FileNotFoundError: no training folder, no class folder in it, or a class folder without images.
        ValueError: bad sizes or statistics; a validation or test folder with class folders that
            the training folder lacks (labels would differ between splits).
    """

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str = "test",
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
        self.val_dir = val_dir
        self.test_dir = test_dir
        self.image_size = image_size
        self.resize = resize
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.name = Path(root).name or "image_folder"
        self.input_shape = (3, image_size, image_size)
        self.class_names = self._class_folders(self._split_dir("train_dir", train_dir, required=True), True)
        self.num_classes = len(self.class_names)
        for argument, name in (("val_dir", val_dir), ("test_dir", test_dir)):
            split = self._split_dir(argument, name, required=False)
            if split is not None:
                self._check_classes(argument, split)

    @property
    def preprocess(self) -> Any:
        """Resize, centre crop, scale to ``[0, 1]`` and normalise: a picture's un-augmented input."""
        return v2.Compose(
            [
                v2.Resize(self.resize),
                v2.CenterCrop(self.image_size),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.mean, self.std),
            ]
        )

    @property
    def has_test(self) -> bool:
        """Whether a test split exists: ``test_dir``, else ``val_dir`` (see :meth:`load`)."""
        return any(self._split_dir(a, n, required=False) for a, n in self._held_out())

    def _held_out(self) -> tuple[tuple[str, str], ...]:
        return (("test_dir", self.test_dir), ("val_dir", self.val_dir))

    def _split_dir(self, argument: str, name: str, required: bool) -> Path | None:
        d = Path(self.root) / name
        if d.is_dir():
            return d
        if required:
            raise FileNotFoundError(
                f"ImageFolder: no training directory {d} (root={self.root!r}, {argument}={name!r}); expected "
                f"{Path(self.root) / name}/<class>/<image files>, and optionally val/ and test/ alike."
            )
        return None

    @staticmethod
    def _class_folders(d: Path, need_images: bool) -> list[str]:
        classes = sorted(e.name for e in os.scandir(d) if e.is_dir())
        if not classes:
            raise FileNotFoundError(
                f"ImageFolder: no class folders in {d}; expected {d}/<class>/<image files> "
                f"(image files: {', '.join(IMAGE_EXTENSIONS)})."
            )
        if need_images:
            empty = [c for c in classes if not _has_image(d / c)]
            if empty:
                raise FileNotFoundError(
                    f"ImageFolder: class folders without images in {d}: {empty[:10]} (image files: "
                    f"{', '.join(IMAGE_EXTENSIONS)}); remove them or add images."
                )
        return classes

    def _check_classes(self, argument: str, d: Path) -> None:
        classes = self._class_folders(d, need_images=False)
        unknown = sorted(set(classes) - set(self.class_names))
        if unknown:
            raise ValueError(
                f"ImageFolder: {d} ({argument}) has class folders that {self.train_dir!r} lacks: {unknown[:10]}; "
                f"labels come from {self.train_dir!r}'s classes {self.class_names[:10]}"
                f"{'...' if len(self.class_names) > 10 else ''}."
            )
        if not any(_has_image(d / c) for c in classes):
            raise FileNotFoundError(
                f"ImageFolder: no image in {d} ({argument}); remove the folder or add images."
            )

    def _dataset(self, d: Path) -> tuple[Dataset, Tensor]:
        dataset = _Split(str(d), self.class_names)
        return dataset, torch.tensor(dataset.targets, dtype=torch.int64)

    def load(self, train: bool) -> tuple[Dataset, Tensor]:
        """The training folder, or the test split: ``test_dir``, else ``val_dir``.

        Raises:
            FileNotFoundError: ``train=False`` and neither folder exists (:attr:`has_test` is false).
        """
        if train:
            return self._dataset(self._split_dir("train_dir", self.train_dir, required=True))
        for argument, name in self._held_out():
            d = self._split_dir(argument, name, required=False)
            if d is not None:
                return self._dataset(d)
        raise FileNotFoundError(
            f"ImageFolder: no test split under {self.root!r} (test_dir={self.test_dir!r}, val_dir={self.val_dir!r}); "
            "the DataModule tests on the validation split carved from the training folder instead."
        )

    def load_val(self) -> tuple[Dataset, Tensor] | None:
        """The ``val_dir`` folder; ``None`` when absent (validation is carved from training)."""
        d = self._split_dir("val_dir", self.val_dir, required=False)
        return None if d is None else self._dataset(d)


def _has_image(d: Path) -> bool:
    """Whether folder ``d`` holds an image file (stops at the first one: cheap on large folders)."""
    return any(any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files) for _, _, files in os.walk(d))


class _Split(datasets.ImageFolder):
    """One split folder labelled by the training folder's classes (a held-out folder may lack a class)."""

    def __init__(self, root: str, classes: list[str]) -> None:
        self._classes = classes
        super().__init__(root, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._classes, {c: i for i, c in enumerate(self._classes)}
