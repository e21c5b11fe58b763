"""Datasets as :class:`ClassificationSource` objects behind one :class:`IndexedDataModule`."""

from datamodules.base import ClassificationSource, IndexedDataModule, IndexedDataset, split_indices
from datamodules.cifar import CIFAR10, CIFAR100
from datamodules.folder import ImageFolder
from datamodules.idx import MNIST, FashionMNIST, read_idx
from datamodules.specialist import GroupOversampler, SpecialistDataModule
from datamodules.tabular import MNIST1D, Digits, Synthetic
from datamodules.transforms import RandomShift

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
    "Digits",
    "MNIST1D",
    "Synthetic",
    "SpecialistDataModule",
    "GroupOversampler",
    "RandomShift",
    "read_idx",
]
