"""Errors of ``kd`` in two lines: which configured argument failed to build, and why.

A class that fails to build under LightningCLI surfaces as a jsonargparse ``ValueError`` ("Does not validate
against any of the Union subtypes ...") wrapped around the real error, after some 80 lines of traceback.
:func:`failing_argument` finds the argument at fault: it lists the classes and functions the configuration
names (``model``, ``model.init_args.student``, ``data.init_args.source``, ...) and walks the real error's
traceback from the innermost frame outwards to the first frame in the module of one of them; when that is
the enclosing class's own code and the failing line calls one of its factory arguments
(``self.net = student(input_shape, num_classes)``), that argument is the one named. :class:`BuildError`
carries the result; ``kd`` prints it in two lines, and the full traceback with ``KD_DEBUG=1``
(or ``kd --debug ...``).
"""

from __future__ import annotations

import importlib
import inspect
import linecache
import re
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from jsonargparse import Namespace

COMPONENTS = ("model", "data", "trainer")
"""The top-level keys of a ``kd fit`` config whose classes :func:`failing_argument` considers."""


@dataclass(frozen=True)
class Configured:
    """A class or function named in the configuration.

    Attributes:
        key: its full key, e.g. ``model.init_args.student``.
        name: its import path as configured.
        value: the class or function.
    """

    key: str
    name: str
    value: Any


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return vars(importlib.import_module(module)).get(name) if module else None
    except ImportError:
        return None


def configured(config: Namespace, components: tuple[str, ...] = COMPONENTS) -> list[Configured]:
    """Every class (a ``class_path`` entry) and function (a callable value) named under ``components``
    of ``config``, outermost first.

    Example:
        >>> cfg = Namespace(model=Namespace(class_path="kd_lightning.modules.ClassifierModule",
        ...     init_args=Namespace(net=Namespace(class_path="kd_lightning.models.MLP", init_args=Namespace()))))
        >>> [(c.key, c.name) for c in configured(cfg)]
        [('model', 'kd_lightning.modules.ClassifierModule'), ('model.init_args.net', 'kd_lightning.models.MLP')]
    """
    found: list[Configured] = []

    def walk(value: Any, key: str) -> None:
        if isinstance(value, Namespace):
            class_path = value.get("class_path") if "class_path" in value else None
            if isinstance(class_path, str):
                target = _import(class_path)
                if inspect.isclass(target) or inspect.isfunction(target):
                    found.append(Configured(key, class_path, target))
            for name, item in vars(value).items():
                walk(item, f"{key}.{name}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{key}[{i}]")
        elif inspect.isclass(value) or inspect.isfunction(value):
            found.append(Configured(key, f"{value.__module__}.{value.__qualname__}", value))

    for component in components:
        if component in config:
            walk(config[component], component)
    return found


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of ``error``'s ``raise ... from`` chain (jsonargparse wraps the real one)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _frames(tb: TracebackType | None) -> Iterator[tuple[str, str, str]]:
    """(module name, function name, source line) of each frame of ``tb``, innermost first."""
    frames = list(traceback.walk_tb(tb))
    for frame, lineno in reversed(frames):
        line = linecache.getline(frame.f_code.co_filename, lineno).strip()
        yield str(frame.f_globals.get("__name__", "")), frame.f_code.co_name, line


def _defines(value: Any, function: str) -> bool:
    """Whether ``value`` (a class or function) is, or its classes define, code named ``function``."""
    if inspect.isclass(value):
        return any(function in vars(klass) for klass in inspect.getmro(value))
    return value.__name__ == function


def failing_argument(error: BaseException, config: Namespace) -> Configured | None:
    """The configured class or function whose code raised ``error`` (see the module's docstring).

    Args:
        error: what building or running the configuration raised (the jsonargparse wrapper or the error itself).
        config: the configuration of the subcommand (``model``, ``data``, ``trainer`` at its top).

    Returns:
        The argument at fault, or ``None`` when no frame of the error lies in a configured class's module.
        When several configured classes share the module and the function, the innermost key is named.
    """
    candidates = configured(config)
    for module, function, line in _frames(root_cause(error).__traceback__):
        here = [c for c in candidates if c.value.__module__ == module]
        if not here:
            continue
        exact = [c for c in here if _defines(c.value, function)] or here
        found = exact[-1]
        # The enclosing class's own line calls one of its factory arguments: that argument is at fault.
        prefix = f"{found.key}.init_args."
        own = [c for c in candidates if c.key.startswith(prefix) and "." not in c.key[len(prefix) :]]
        called = [c for c in own if re.search(rf"\b{re.escape(c.key[len(prefix) :])}\(", line)]
        return called[0] if len(called) == 1 else found
    return None


class BuildError(Exception):
    """A configured class failed to build (or to find its data) before anything trained.

    Args:
        argument: the argument at fault, or ``None`` when it could not be told.
        error: what was raised (its root cause is reported).
        stage: what was being done, e.g. ``"building"`` or ``"setting up"``.
    """

    def __init__(self, argument: Configured | None, error: BaseException, stage: str = "building") -> None:
        cause = root_cause(error)
        reason = str(cause).strip().splitlines()
        where = f"{argument.key} ({argument.name})" if argument else "the configuration"
        text = reason[0] if reason else ""
        super().__init__(f"{stage} {where} failed: {type(cause).__name__}: {text}".rstrip(": "))
        self.argument = argument
