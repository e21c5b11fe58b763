"""Intermediate features of a network by module name, captured with forward hooks that exist only while
one forward pass is captured.

Layers are named as ``net.named_modules()`` names them (``features.6``, ``stages.1``); a name the network
does not have is an error that lists the names it has. The hooks are registered when a capture starts and
removed when it ends, even on an exception, so a network outside a capture (evaluation, prediction, a
checkpoint, another module holding it) carries none.

Example:
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> taps = FeatureTaps.of(net, ["0", "2"], "layers")
    >>> with taps.capture() as features:
    ...     out = net(torch.zeros(5, 4))
    >>> [tuple(f.shape) for f in features], len(net[0]._forward_hooks)
    ([(5, 3), (5, 2)], 0)
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def resolve_layers(net: nn.Module, names: Sequence[str], argument: str) -> list[nn.Module]:
    """The submodules of ``net`` named ``names`` (as ``net.named_modules()`` names them).

    Raises:
        ValueError: a name ``net`` does not have; the message names ``argument`` and lists the available names.

    Example:
        >>> resolve_layers(nn.Sequential(nn.Linear(2, 2)), ["1"], "student_layers")
        Traceback (most recent call last):
        ...
        ValueError: `student_layers`: Sequential has no module named '1'; available: 0.
    """
    modules = {name: module for name, module in net.named_modules() if name}
    missing = [name for name in names if name not in modules]
    if missing:
        wrong = ", ".join(repr(n) for n in missing)
        raise ValueError(
            f"`{argument}`: {type(net).__name__} has no module named {wrong}; available: {', '.join(modules)}."
        )
    return [modules[name] for name in names]


class FeatureCapture:
    """One capture: hooks on ``modules`` from ``__enter__`` to ``__exit__``; the context value is the list of
    their outputs, filled in the order of ``names`` when the block ends.

    A module called more than once in the block keeps its last output.

    Raises (on leaving the block without an exception):
        RuntimeError: a module did not run during the block (it is not on the forward path).
        TypeError: a module's output is not a tensor.
    """

    def __init__(self, modules: Sequence[nn.Module], names: Sequence[str]) -> None:
        self.modules = list(modules)
        self.names = list(names)
        self.features: list[Tensor] = []
        self._outputs: dict[int, Any] = {}
        self._handles: list[RemovableHandle] = []

    def _hook(self, position: int) -> Any:
        def store(module: nn.Module, args: Any, output: Any) -> None:
            self._outputs[position] = output

        return store

    def __enter__(self) -> list[Tensor]:
        self._outputs.clear()
        self.features.clear()
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self.features

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        outputs, self._outputs = self._outputs, {}
        if kind is not None:
            return
        silent = [name for i, name in enumerate(self.names) if i not in outputs]
        if silent:
            raise RuntimeError(
                f"layers {silent} did not run during the forward pass: hook layers that the network's "
                "forward calls (see `named_modules()`)."
            )
        for i, name in enumerate(self.names):
            if not isinstance(outputs[i], Tensor):
                raise TypeError(
                    f"layer {name!r} returned a {type(outputs[i]).__name__}, not a tensor; hook a layer whose "
                    "output is one tensor."
                )
            self.features.append(outputs[i])


class FeatureTaps:
    """Named layers of one network, resolved once, captured on demand (:meth:`capture`).

    The modules are held by reference, not registered as submodules: a wrapper put around the network
    afterwards (``TeacherPlacement``'s, DDP's) leaves them where they are, and the hooks still fire.

    Args:
        modules: the layers.
        names: their names, for messages.
    """

    def __init__(self, modules: Sequence[nn.Module], names: Sequence[str]) -> None:
        self.modules = list(modules)
        self.names = list(names)

    @classmethod
    def of(cls, net: nn.Module, names: Sequence[str], argument: str) -> FeatureTaps:
        """The taps on ``net``'s layers ``names`` (:func:`resolve_layers`; ``argument`` names them in errors)."""
        return cls(resolve_layers(net, names, argument), names)

    def capture(self) -> FeatureCapture:
        """A context manager: hooks registered on entry, removed on exit; its value lists the outputs."""
        return FeatureCapture(self.modules, self.names)


@torch.no_grad()
def feature_shapes(net: nn.Module, taps: FeatureTaps, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shapes (without the batch axis) of the tapped features for one input of ``input_shape``.

    One forward pass of a zero input in eval mode (BatchNorm statistics untouched); ``net``'s mode is restored.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2))
        >>> feature_shapes(net, FeatureTaps.of(net, ["1"], "layers"), (1, 8, 8))
        [(4, 4, 4)]
    """
    mode = net.training
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    net.eval()
    try:
        with taps.capture() as features:
            net(torch.zeros(1, *input_shape, device=device))
    finally:
        net.train(mode)
    return [tuple(f.shape[1:]) for f in features]
