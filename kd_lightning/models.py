"""Small networks: MLP, SmallCNN (images), CNN1D (signals). Every network is
``Net(input_shape, num_classes, ...)``: the first two arguments come from the DataModule (linked by the
CLI), the rest from the config's ``init_args``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs.

    Hinton et al.'s MNIST teacher is ``hidden=(1200, 1200), dropout=0.5`` (with input jitter), the
    student ``hidden=(800, 800)`` with no regularisation.

    Args:
        input_shape: shape of one input, e.g. ``(1, 28, 28)``.
        num_classes: number of output logits.
        hidden: sizes of the hidden layers; ``()`` is logistic regression.
        dropout: dropout after every hidden layer.
        input_dropout: dropout on the input (the paper's teacher used 0.2).

    Example:
        >>> MLP((1, 28, 28), 10, hidden=(800, 800))(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        hidden: tuple[int, ...] = (800, 800),
        dropout: float = 0.0,
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout:
            layers.append(nn.Dropout(input_dropout))
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """VGG-style CNN for small images: stages of two 3x3 conv-BN-ReLU then 2x2 max-pool, then an MLP head.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: number of output logits.
        channels: output channels of each stage; each stage halves the resolution.
        head: hidden size of the classifier head.
        dropout: dropout before each head layer.
        channels_last: keep activations NHWC, which oneDNN (CPU) and tensor cores (GPU) run faster
            (about 1.25x per training step on a 2-core CPU).

    Example:
        >>> SmallCNN((1, 28, 28), 10, channels=(8, 16))(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        channels: tuple[int, ...] = (16, 32),
        head: int = 256,
        dropout: float = 0.3,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        if len(input_shape) != 3:
            raise ValueError(f"SmallCNN needs `input_shape` (C, H, W), got {tuple(input_shape)}.")
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for out in channels:
            layers += _conv_bn(c, out) + _conv_bn(out, out) + [nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c * h * w, head),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(head, num_classes),
        )
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.classifier(self.features(x))


class CNN1D(nn.Module):
    """A small 1-D CNN for signals such as MNIST-1D: three strided conv-ReLU layers, then a linear head.

    Args:
        input_shape: ``(channels, length)``.
        num_classes: number of output logits.
        channels: width of the three convolutions.

    Raises:
        ValueError: ``input_shape`` is not ``(channels, length)``.

    Example:
        >>> CNN1D((1, 40), 10, channels=8)(torch.zeros(2, 1, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: int = 32) -> None:
        super().__init__()
        if len(input_shape) != 2:
            raise ValueError(f"CNN1D needs `input_shape` (C, L), got {tuple(input_shape)}.")
        c, length = input_shape
        self.features = nn.Sequential(
            nn.Conv1d(c, channels, 5, stride=2, padding=2),
            nn.ReLU(inplace=True),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
        )
        with torch.no_grad():
            width = self.features(torch.zeros(1, c, length)).numel()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
