"""A larger transfer set: one dataset's training file extended with another source's training inputs.

The paper's transfer set may hold inputs the student never had labels for (a distilled student with
hard-label weight 0 never reads them); a generated dataset such as MNIST-1D can supply as many as
wanted, offline.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from kd_lightning.datamodules.base import ClassificationSource


class ExtraTraining(ClassificationSource):
    """``base`` with the training file of ``extra`` appended to its training file; the test file is base's.

    Positions (the batch contract's ``index``) of ``base``'s training samples are unchanged; ``extra``'s
    follow them. ``extra`` must describe the same task (classes and input shape).

    Args:
        base: the dataset whose test file, name prefix and class names are kept.
        extra: the source of the additional training inputs.

    Raises:
        ValueError: if the two sources' classes or input shapes differ.
    """

    def __init__(self, base: ClassificationSource, extra: ClassificationSource) -> None:
        if (base.num_classes, tuple(base.input_shape)) != (extra.num_classes, tuple(extra.input_shape)):
            raise ValueError(
                f"`extra` must have base's {base.num_classes} classes and input shape {tuple(base.input_shape)}, "
                f"got {extra.num_classes} and {tuple(extra.input_shape)}."
            )
        self.base, self.extra = base, extra
        self.name = f"{base.name}+{extra.name}"
        self.num_classes, self.input_shape, self.class_names = (
            base.num_classes,
            base.input_shape,
            base.class_names,
        )

    def prepare(self) -> None:
        self.base.prepare()
        self.extra.prepare()

    def load(self, train: bool) -> tuple[Dataset, Tensor]:
        if not train:
            return self.base.load(False)
        (base_data, base_y), (extra_data, extra_y) = self.base.load(True), self.extra.load(True)
        x = torch.cat([_inputs(base_data, base_y), _inputs(extra_data, extra_y)])
        y = torch.cat([base_y, extra_y])
        return TensorDataset(x, y), y


def _inputs(data: Dataset, targets: Tensor) -> Tensor:
    """The inputs of a source's dataset as one tensor (items are ``(input, target)``)."""
    return torch.stack([data[i][0] for i in range(len(targets))])
