"""Small generated or bundled datasets for fast experiments and tests: no files, no network.

* :class:`Digits`: scikit-learn's 8x8 handwritten digits (bundled with scikit-learn).
* :class:`MNIST1D`: Greydanus' MNIST-1D, generated from its templates by the ``mnist1d`` package.
* :class:`Synthetic`: Gaussian classes with planted superclasses, for checking that specialist
  clustering recovers the confusable groups.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from kd_lightning.datamodules.base import ClassificationSource


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[Dataset, Tensor]:
    xt = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    yt = torch.as_tensor(np.ascontiguousarray(y), dtype=torch.int64)
    return TensorDataset(xt, yt), yt


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"`{name}` must lie in (0, 1), got {value!r}.")


class Digits(ClassificationSource):
    """scikit-learn's optical-recognition digits: 1797 8x8 grey images, 10 classes, values 0..16.

    There is no official test split, so a stratified one is carved deterministically from ``seed``;
    ``load(train=True)`` returns the rest. Pixels are scaled to ``[0, 1]`` and standardised with the
    whole set's mean and standard deviation (constants, so both splits get the same map).

    Args:
        test_size: fraction of the samples held out as the test split.
        seed: seed of that split.
    """

    name = "digits"
    num_classes = 10
    input_shape = (1, 8, 8)
    class_names = [str(i) for i in range(10)]
    mean, std = 0.3053, 0.3760  # of all 1797 images after dividing by 16

    def __init__(self, test_size: float = 0.2, seed: int = 0) -> None:
        _check_fraction("test_size", test_size)
        self.test_size = test_size
        self.seed = seed

    def load(self, train: bool) -> tuple[Dataset, Tensor]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        x = (bunch.data.reshape(-1, *self.input_shape) / 16.0 - self.mean) / self.std
        y = bunch.target
        train_idx, test_idx = train_test_split(
            np.arange(len(y)), test_size=self.test_size, random_state=self.seed, stratify=y
        )
        # Sorted, so positions (the batch contract's ``index``) follow the original order.
        keep = np.sort(train_idx if train else test_idx)
        return _tensors(x[keep], y[keep])


class MNIST1D(ClassificationSource):
    """MNIST-1D (Greydanus 2020): 40-sample 1-D signals made from 10 digit templates by random padding,
    scaling, translation, correlated noise and shear.

    Generated with ``mnist1d.data.make_dataset`` and the package's default arguments, which
    splits the samples 80/20 into train and test and standardises them. The package's
    ``get_dataset`` is not used: it downloads a pickle and writes one into the working directory.

    Args:
        num_samples: samples generated in total (train and test; rounded down to a multiple of 10).
        seed: generation seed; the same seed gives the same data.
        train_split: fraction of the samples in the training split.
    """

    name = "mnist1d"
    num_classes = 10
    input_shape = (1, 40)
    class_names = [str(i) for i in range(10)]

    def __init__(self, num_samples: int = 5000, seed: int = 42, train_split: float = 0.8) -> None:
        if not (isinstance(num_samples, int) and num_samples >= 20):
            raise ValueError(
                f"`num_samples` must be an integer >= 20 (two per class and split), got {num_samples!r}."
            )
        _check_fraction("train_split", train_split)
        self.num_samples = num_samples
        self.seed = seed
        self.train_split = train_split
        self._data: dict[str, np.ndarray] | None = None

    def _generate(self) -> dict[str, np.ndarray]:
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ModuleNotFoundError as missing:  # a demo dependency, not installed with the library itself
            raise ModuleNotFoundError(
                "MNIST1D needs the `mnist1d` package, an extra of kd-lightning: pip install 'kd-lightning[demo]'."
            ) from missing

        args = get_dataset_args()
        if args.final_seq_length != self.input_shape[-1]:
            raise RuntimeError(
                f"MNIST1D: mnist1d's default final_seq_length is {args.final_seq_length}, expected {self.input_shape[-1]}."
            )
        args.num_samples = self.num_samples
        args.seed = self.seed
        args.train_split = self.train_split
        # make_dataset seeds the global `random` and `numpy` generators; leave the caller's untouched.
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            return make_dataset(args)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def load(self, train: bool) -> tuple[Dataset, Tensor]:
        if self._data is None:  # one generation yields both splits
            self._data = self._generate()
        x, y = (self._data["x"], self._data["y"]) if train else (self._data["x_test"], self._data["y_test"])
        return _tensors(x[:, None, :], y)


class Synthetic(ClassificationSource):
    """Gaussian classes in ``dim`` dimensions with planted superclasses of confusable classes.

    Superclass centres are drawn at typical mutual distance ``superclass_sep``; each class centre is its
    superclass centre plus an offset at typical distance ``class_sep`` from its siblings; samples add
    isotropic noise of standard deviation ``noise`` per coordinate. With ``class_sep`` much smaller than
    ``superclass_sep`` a classifier confuses classes within a superclass and rarely across, which is
    the structure that specialist clustering (Hinton et al. 2015, section 5) should recover.

    Classes ``g * classes_per_superclass ... (g + 1) * classes_per_superclass - 1`` form superclass
    ``g``; :attr:`superclass_of` lists each class's superclass.

    With the defaults a nearest-true-mean classifier scores about 0.79 and a one-hidden-layer MLP about
    0.70 on the test split (chance 0.02), and more than 98% of the errors stay inside a superclass.

    Args:
        num_superclasses: number of planted groups.
        classes_per_superclass: classes in each group.
        dim: input dimension.
        train_per_class: training samples per class.
        test_per_class: test samples per class.
        superclass_sep: typical distance between two superclass centres.
        class_sep: typical distance between two class centres of the same superclass.
        noise: per-coordinate standard deviation of the samples around their class centre.
        seed: generation seed; the same seed gives the same centres and samples.
    """

    name = "synthetic"

    def __init__(
        self,
        num_superclasses: int = 10,
        classes_per_superclass: int = 5,
        dim: int = 32,
        train_per_class: int = 100,
        test_per_class: int = 20,
        superclass_sep: float = 12.0,
        class_sep: float = 3.0,
        noise: float = 1.0,
        seed: int = 0,
    ) -> None:
        for arg, value in (
            ("num_superclasses", num_superclasses),
            ("classes_per_superclass", classes_per_superclass),
            ("dim", dim),
            ("train_per_class", train_per_class),
            ("test_per_class", test_per_class),
        ):
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"`{arg}` must be a positive integer, got {value!r}.")
        for arg, value in (("superclass_sep", superclass_sep), ("class_sep", class_sep), ("noise", noise)):
            if value < 0:
                raise ValueError(f"`{arg}` must be >= 0, got {value!r}.")
        self.num_superclasses = num_superclasses
        self.classes_per_superclass = classes_per_superclass
        self.dim = dim
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class
        self.superclass_sep = superclass_sep
        self.class_sep = class_sep
        self.noise = noise
        self.seed = seed
        self.num_classes = num_superclasses * classes_per_superclass
        self.input_shape = (dim,)
        self.superclass_of = [c // classes_per_superclass for c in range(self.num_classes)]
        self.class_names = [
            f"s{c // classes_per_superclass}c{c % classes_per_superclass}" for c in range(self.num_classes)
        ]

    def _rngs(self) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
        # Independent streams for centres, train and test: each split is the same whichever loads first.
        centres, train, test = np.random.SeedSequence(self.seed).spawn(3)
        return np.random.default_rng(centres), np.random.default_rng(train), np.random.default_rng(test)

    def class_means(self) -> np.ndarray:
        """The ``num_classes x dim`` class centres (the planted truth)."""
        rng, _, _ = self._rngs()
        # Two independent N(0, s^2 I) points are sqrt(2 * dim) * s apart on average.
        scale = 1.0 / np.sqrt(2 * self.dim)
        groups = rng.standard_normal((self.num_superclasses, self.dim)) * self.superclass_sep * scale
        offsets = rng.standard_normal((self.num_classes, self.dim)) * self.class_sep * scale
        return groups[self.superclass_of] + offsets

    def load(self, train: bool) -> tuple[Dataset, Tensor]:
        means = self.class_means()
        _, train_rng, test_rng = self._rngs()
        rng, per_class = (train_rng, self.train_per_class) if train else (test_rng, self.test_per_class)
        y = np.repeat(np.arange(self.num_classes), per_class)
        y = y[rng.permutation(len(y))]  # mixed order, not blocks of one class
        x = means[y] + self.noise * rng.standard_normal((len(y), self.dim))
        return _tensors(x, y)
