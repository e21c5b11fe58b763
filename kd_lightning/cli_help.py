"""What ``kd`` says about itself: its description and examples, and help that lists only classes a user can pick.

jsonargparse ends the help of every argument typed with a class with "known subclasses: ...": every
subclass of that class imported at the time, found by walking ``__subclasses__()`` from the type
(``jsonargparse._typehints.get_all_subclass_paths``, called by ``ActionTypeHint.extra_help``). For a
network argument (``student: Callable[[input_shape, num_classes], nn.Module]``, ``teacher: nn.Module``) that
is every module torch, torchvision and torchmetrics define: 474 of the 1,408 lines of
``kd fit --model.help DistillationModule``, none of them a network that takes ``(input_shape, num_classes)``.
:class:`KDHelpFormatter` keeps short lists as they are and cuts long ones to kd-lightning's own classes
(:func:`shorten_known_subclasses`); :class:`KDArgumentParser` makes it the formatter of every ``kd`` parser,
including the ones jsonargparse builds for ``--*.help CLASS`` (it builds them with ``type(parser)``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from typing import Any, NoReturn

import lightning as L
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser

DESCRIPTION = """\
kd-lightning: knowledge distillation (Hinton, Vinyals & Dean 2015) on PyTorch Lightning.
Teachers, students, ensembles and specialists train from YAML configs whose models and data are
chosen by class_path; a teacher's soft targets can be cached once and reused by every student."""
"""The first paragraph of ``kd --help``."""

EXAMPLES = """\
examples:
  kd configs                                                # copy the shipped configs (installed with kd) to ./configs
  kd fit --config configs/fashion_mnist/teacher.yaml        # fit a teacher
  kd fit --config configs/fashion_mnist/distill_cached.yaml # distil a student through the soft-target cache
  kd fit --config configs/fashion_mnist/distill.yaml --ckpt_path last   # resume the run's newest checkpoint
  kd fit --config configs/fashion_mnist/distill.yaml --print_config     # the merged config, nothing run
  kd fit --model.help kd_lightning.modules.DistillationModule           # a model's arguments
  kd stage --name teacher --config configs/fashion_mnist/teacher.yaml -- --trainer.max_epochs=1
  kd members --config configs/fashion_mnist/member.yaml --members '[0, 1, 2]' --out runs/members

other options:
  --version                 print the version of kd-lightning and exit
  --debug                   (first, as in `kd --debug fit ...`) show full tracebacks; the same as KD_DEBUG=1

Errors while building a model or data module are reported in two lines naming the argument
(e.g. model.init_args.student) and the cause; KD_DEBUG=1 (or --debug) prints the full traceback.
Documentation: docs/cli.md."""
"""The end of ``kd --help``, after the subcommands and workflows."""

KNOWN_SUBCLASSES = ", known subclasses: "
"""How jsonargparse introduces the list of known subclasses in an argument's help."""

LISTED = 40
"""Longest "known subclasses" list shown in full (torch's 16 optimizers are); longer ones are cut."""

NETWORK_MODULES = ("kd_lightning.models", "kd_lightning.resnets")
"""Modules whose classes a cut list keeps, beside the classes the ``kd_lightning`` package itself exports."""

DEBUG_VARIABLE = "KD_DEBUG"
"""Environment variable that, set to a non-empty value other than ``0``, makes ``kd`` show full tracebacks."""


def debug_enabled() -> bool:
    """Whether ``kd`` shows full tracebacks (``KD_DEBUG`` set and not ``0``; ``kd --debug`` sets it)."""
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def _is_listed(class_path: str) -> bool:
    """Whether a cut "known subclasses" list keeps ``class_path``: a class exported by ``kd_lightning`` itself
    (``kd_lightning.MLP``, ``kd_lightning.Ensemble``) or defined in :data:`NETWORK_MODULES`, unless it is a
    LightningModule (a module is never a network, a source or an objective of another module).

    Example:
        >>> [_is_listed(p) for p in ("kd_lightning.MLP", "kd_lightning.ClassifierModule", "torch.nn.Linear")]
        [True, False, False]
    """
    module, _, name = class_path.rpartition(".")
    if module != "kd_lightning" and module not in NETWORK_MODULES:
        return False
    value = vars(importlib.import_module(module)).get(name)
    return isinstance(value, type) and not issubclass(value, L.LightningModule)


def shorten_known_subclasses(help_text: str, limit: int = LISTED) -> str:
    """``help_text`` with its "known subclasses" list cut to kd-lightning's own classes when it is longer than
    ``limit``; the others are counted by top-level package.

    Args:
        help_text: one argument's help as jsonargparse writes it (``"... (type: X, known subclasses: a, b)"``).
        limit: lists of at most this many class paths are kept whole.

    Returns:
        The help text, shortened or as given.

    Example:
        >>> names = ["kd_lightning.MLP"] + [f"torch.nn.M{i}" for i in range(50)]
        >>> shorten_known_subclasses("net. (type: Module, known subclasses: " + ", ".join(names) + ")")
        'net. (type: Module, known subclasses: kd_lightning.MLP, or any importable class path (50 in torch not listed))'
        >>> shorten_known_subclasses("net. (type: Module, known subclasses: torch.nn.Linear)")
        'net. (type: Module, known subclasses: torch.nn.Linear)'
    """
    head, found, tail = help_text.rpartition(KNOWN_SUBCLASSES)
    if not found or not tail.endswith(")"):
        return help_text
    paths = tail[:-1].split(", ")
    if len(paths) <= limit:
        return help_text
    kept = [p for p in paths if _is_listed(p)]
    dropped: dict[str, int] = {}
    for path in paths:
        if path not in kept:
            top = path.partition(".")[0]
            dropped[top] = dropped.get(top, 0) + 1
    others = ", ".join(f"{count} in {top}" for top, count in sorted(dropped.items(), key=lambda kv: -kv[1]))
    listed = ", ".join(kept) + ", or " if kept else ""
    return f"{head}{KNOWN_SUBCLASSES}{listed}any importable class path ({others} not listed))"


class KDHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter with long "known subclasses" lists shortened
    (:func:`shorten_known_subclasses`) and descriptions printed with their own line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        return shorten_known_subclasses(text) if text else text

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        # As argparse.RawDescriptionHelpFormatter: descriptions and docstrings keep their lines.
        return "".join(indent + line for line in text.splitlines(keepends=True))


_KEY = re.compile(r'Parser key "([^"]+)":')
_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "- Expected a <class 'NoneType'>",
    "Given value",
)


def summarize_parse_error(message: str) -> str:
    """One line out of a jsonargparse parse error: the full key of the argument at fault and the innermost
    reason (the nested "Parser key"/"Problem with given class_path" lines joined into
    ``model.init_args.net``).

    Args:
        message: the message jsonargparse passes to ``ArgumentParser.error``.

    Returns:
        ``"<key>: <reason>"``, or the message's first line when it names no key.

    Example:
        >>> summarize_parse_error('Parser key "model":\\n  Errors:\\n    - Problem with given class_path '
        ...     "'kd_lightning.modules.ClassifierModule':\\n        Parser key \\"net\\":\\n          Option 'hiddn' "
        ...     "is not accepted. Got value: Namespace(a=1)\\n    - Expected a <class 'NoneType'>")
        "model.init_args.net: Option 'hiddn' is not accepted"
    """
    keys: list[str] = []
    reason = ""
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ")
        key = _KEY.match(line)
        if key:
            keys.append(key.group(1))
            reason = line[key.end() :].strip()  # the reason follows the innermost key
        elif line.startswith("Problem with given class_path"):
            keys.append("init_args")
        elif line and not reason and not line.startswith(_NOISE):
            reason = line
    while keys and keys[-1] == "init_args":  # a class's own argument: named by the class's key
        keys.pop()
    reason = re.sub(r"\. Got value: .*$", "", reason or message.strip().partition("\n")[0])
    return f"{'.'.join(keys)}: {reason}" if keys else reason


class KDArgumentParser(LightningArgumentParser):
    """The parser of every ``kd`` command: kd-lightning's description, :class:`KDHelpFormatter`, and parse
    errors in two lines (:func:`summarize_parse_error`; ``KD_DEBUG=1`` for jsonargparse's own report)."""

    def __init__(
        self,
        *args: Any,
        description: str = DESCRIPTION,
        formatter_class: type[argparse.HelpFormatter] = KDHelpFormatter,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, description=description, formatter_class=formatter_class, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debug_enabled():
            super().error(message, ex)
        prog = self.prog.replace(" [options]", "")
        sys.stderr.write(
            f"{prog}: error: {summarize_parse_error(message)}\n"
            f"({prog} --help lists the arguments; KD_DEBUG=1 shows the full report.)\n"
        )
        sys.exit(2)
