"""Datasets as :class:`ClassificationSource` objects behind one :class:`IndexedDataModule`."""

from kd_lightning.datamodules.base import (
    ClassificationSource,
    IndexedDataModule,
    IndexedDataset,
    split_indices,
)
from kd_lightning.datamodules.cifar import CIFAR10, CIFAR100
from kd_lightning.datamodules.extra import ExtraTraining
from kd_lightning.datamodules.folder import ImageFolder
from kd_lightning.datamodules.idx import MNIST, FashionMNIST, read_idx
from kd_lightning.datamodules.loading import LoaderSettings, cpus_given, loader_options
from kd_lightning.datamodules.specialist import GroupOversampler, SpecialistDataModule
from kd_lightning.datamodules.tabular import MNIST1D, Digits, Synthetic
from kd_lightning.datamodules.transforms import RandomRoll, RandomShift, TorchvisionTransform

__all__ = [
    "ClassificationSource",
    "IndexedDataset",
    "IndexedDataModule",
    "split_indices",
    "FashionMNIST",
    "MNIST",
    "CIFAR10",
    "CIFAR100",
    "ImageFolder",
    "ExtraTraining",
    "Digits",
    "MNIST1D",
    "Synthetic",
    "SpecialistDataModule",
    "GroupOversampler",
    "RandomRoll",
    "RandomShift",
    "TorchvisionTransform",
    "read_idx",
    "LoaderSettings",
    "cpus_given",
    "loader_options",
]
