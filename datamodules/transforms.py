"""Batch-free tensor augmentations for in-memory image data (fast on CPU, no PIL round trip).

An augmentation can be *replayed*: given a :class:`torch.Generator`, a :class:`Transform` draws every
random number from it, so seeding the generator with :func:`replay_seed` ``(seed, index, view)`` makes
view ``view`` of sample ``index`` the same tensor in every process, worker and run. The soft-target
cache relies on this to store the teacher's outputs for exactly the views the student will see.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_MASK64 = (1 << 64) - 1


class Transform(ABC):
    """A tensor-to-tensor augmentation of one input, chosen by ``class_path`` in YAML.

    Subclasses draw all their randomness from ``generator`` when one is given (torch's global RNG
    otherwise), so that an augmentation can be replayed; they should also define ``__repr__`` with
    every argument, which is how a soft-target store recognises the augmentation it was built with.

    Attributes:
        raw_input: the transform takes the source's item itself (e.g. a decoded picture), not the
            un-augmented input tensor that the source's ``preprocess`` makes of it.
    """

    raw_input: bool = False

    @abstractmethod
    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor: ...


def _splitmix64(x: int) -> int:
    # Steele et al.'s SplitMix64 finaliser: every input bit affects every output bit, so nearby
    # (seed, index, view) triples give unrelated generator seeds.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def replay_seed(seed: int, index: int, view: int) -> int:
    """The generator seed of augmentation view ``view`` of sample ``index`` under run seed ``seed``.

    A pure function of its arguments (no Python ``hash``, which varies between processes), in
    ``[0, 2**64)``, the range :meth:`torch.Generator.manual_seed` accepts.

    Args:
        seed: the augmentation seed of the run (``augment_seed`` of the DataModule).
        index: the sample's index (its position in the source split).
        view: which augmentation of the sample, ``>= 0``.

    Example:
        >>> replay_seed(0, 7, 1) == replay_seed(0, 7, 1) != replay_seed(0, 7, 2)
        True
        >>> g = torch.Generator().manual_seed(replay_seed(0, 7, 1))
        >>> x = torch.arange(16.0).view(1, 4, 4)
        >>> a = RandomShift(1, hflip=True)(x, generator=g)
        >>> torch.equal(a, RandomShift(1, hflip=True)(x, torch.Generator().manual_seed(replay_seed(0, 7, 1))))
        True
    """
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (index & _MASK64))
    return _splitmix64(h ^ (view & _MASK64))


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

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        s = self.max_shift
        if s:
            h, w = x.shape[-2:]
            dy, dx = torch.randint(0, 2 * s + 1, (2,), generator=generator).tolist()
            x = F.pad(x, (s, s, s, s))[..., dy : dy + h, dx : dx + w]
        if self.hflip and torch.rand((), generator=generator) < 0.5:
            x = x.flip(-1)
        return x

    def __repr__(self) -> str:
        return f"RandomShift(max_shift={self.max_shift}, hflip={self.hflip})"


class RandomRoll(Transform):
    """Shift a signal circularly along its last axis by up to ``max_shift`` samples, either way.

    MNIST-1D builds its signals by translating digit templates circularly, so a circular shift is
    label-preserving there: augmentation that teaches translation invariance, which a network trained
    without it has to learn from fewer examples.

    Args:
        max_shift: largest shift in samples; each call draws one of ``-max_shift .. max_shift``.

    Example:
        >>> x = torch.arange(6.0).reshape(1, 6)
        >>> RandomRoll(2)(x, torch.Generator().manual_seed(0)).tolist()
        [[4.0, 5.0, 0.0, 1.0, 2.0, 3.0]]
    """

    def __init__(self, max_shift: int = 5) -> None:
        if not (isinstance(max_shift, int) and max_shift >= 0):
            raise ValueError(f"`max_shift` must be an integer >= 0, got {max_shift!r}.")
        self.max_shift = max_shift

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if not self.max_shift:
            return x
        k = int(torch.randint(-self.max_shift, self.max_shift + 1, (), generator=generator))
        return x.roll(k, dims=-1)

    def __repr__(self) -> str:
        return f"RandomRoll(max_shift={self.max_shift})"


class TorchvisionTransform(Transform):
    """A torchvision pipeline (``torchvision.transforms.v2``, e.g. ``RandomResizedCrop``, flips,
    ``Normalize``) as a replayable :class:`Transform` on the source's items (``raw_input``: an image
    folder's pictures, before its resize and crop).

    torchvision draws its random numbers from torch's global generator. Given ``generator``, the
    pipeline runs with the global CPU generator seeded from it (its state restored afterwards), so view
    ``v`` of sample ``j`` is the same crop in every process and worker: the soft-target cache's
    augmentation-consistent mode replays it. Without ``generator`` it draws from the global generator.

    Args:
        transform: the pipeline, called on one item; it must return a float tensor.

    Example:
        >>> from torchvision.transforms import v2
        >>> crop = TorchvisionTransform(v2.RandomResizedCrop(4))
        >>> x = torch.arange(64.0).view(1, 8, 8)
        >>> torch.equal(crop(x, torch.Generator().manual_seed(1)), crop(x, torch.Generator().manual_seed(1)))
        True
    """

    raw_input = True

    def __init__(self, transform: Callable[[Any], Any]) -> None:
        self.transform = transform

    def __call__(self, x: Any, generator: torch.Generator | None = None) -> Any:
        if generator is None:
            return self.transform(x)
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.transform(x)

    def __repr__(self) -> str:
        return f"TorchvisionTransform({self.transform!r})"
