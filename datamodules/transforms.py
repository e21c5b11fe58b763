"""Batch-free tensor augmentations for in-memory image data (fast on CPU, no PIL round trip)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor


class Transform(ABC):
    """A tensor-to-tensor augmentation of one input, chosen by ``class_path`` in YAML."""

    @abstractmethod
    def __call__(self, x: Tensor) -> Tensor: ...


class RandomShift(Transform):
    """Translate a ``(C, H, W)`` image by up to ``max_shift`` pixels (zero padding), optionally flip it.

    Hinton et al. jittered MNIST inputs by up to 2 pixels; for Fashion-MNIST a horizontal flip is
    label-preserving too.

    Args:
        max_shift: largest shift in pixels along each axis.
        hflip: also flip left-right with probability 1/2.
    """

    def __init__(self, max_shift: int = 2, hflip: bool = False) -> None:
        if max_shift < 0:
            raise ValueError(f"`max_shift` must be >= 0, got {max_shift}.")
        self.max_shift = max_shift
        self.hflip = hflip

    def __call__(self, x: Tensor) -> Tensor:
        s = self.max_shift
        if s:
            h, w = x.shape[-2:]
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            x = F.pad(x, (s, s, s, s))[..., dy : dy + h, dx : dx + w]
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x

    def __repr__(self) -> str:
        return f"RandomShift(max_shift={self.max_shift}, hflip={self.hflip})"
