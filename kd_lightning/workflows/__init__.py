"""The library's workflows: what the scripts and the ``kd <workflow>`` subcommands run.

Each workflow is a typed, documented function (``Args:``, ``Returns:``) that can be called from Python
and, through :data:`WORKFLOWS`, from the command line: ``kd <workflow> --help`` lists its arguments,
built by jsonargparse from the function's signature and docstring; arguments after ``--`` are the
``kd`` arguments of its runs (its ``overrides``). The result is printed as JSON.

    kd stage --name teacher --config configs/fashion_mnist/teacher.yaml -- --trainer.max_epochs=1
    kd members --config configs/fashion_mnist/member.yaml --members '[0, 1, 2]' --out runs/members
    kd specialists --config configs/fashion_mnist/specialist.yaml --evaluate true
    kd summary --results '[runs/a/seed1/checkpoints/result.json, runs/a/seed2/checkpoints/result.json]'

The registry names functions by ``"module:function"`` and imports a module only when its workflow runs,
so that ``import kd_lightning.workflows`` stays light and one workflow's dependencies never burden another.

Modules: :mod:`~kd_lightning.workflows.stage` (one config fitted and tested, reused when finished),
:mod:`~kd_lightning.workflows.members` (ensemble members and seeds), :mod:`~kd_lightning.workflows.specialists`
(every specialist of a groups file, and their combination), :mod:`~kd_lightning.workflows.regimes` and
:mod:`~kd_lightning.workflows.specialist_study` and :mod:`~kd_lightning.workflows.capacity_study` (the benchmarks' runs, shared with the reproduction),
:mod:`~kd_lightning.workflows.specialist_cost` (specialists against single bigger models at equal FLOPs and latency),
:func:`kd_lightning.summary.summarize` (mean ± std over finished stages).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kd_lightning.shipped import shipped_configs

CONFIGS = shipped_configs()
"""The shipped configs (the benchmarks' workflows run them): a checkout's ``configs/``, or their installed copy."""

WORKFLOWS: dict[str, str] = {
    "stage": "kd_lightning.workflows.stage:run_stage",
    "members": "kd_lightning.workflows.members:train_members",
    "specialists": "kd_lightning.workflows.specialists:train_specialists",
    "summary": "kd_lightning.summary:summarize",
    "fill-store": "kd_lightning.workflows.fill_store:fill_store",
    "choose": "kd_lightning.workflows.selection:choose_on_validation",
    "ensemble-kd": "kd_lightning.workflows.ensemble_distillation:distil_ensemble",
    "specialists-kd": "kd_lightning.workflows.specialist_distillation:distil_specialists",
    "feature-kd": "kd_lightning.workflows.feature_study:compare_feature_methods",
    "specialist-cost": "kd_lightning.workflows.specialist_cost:specialist_cost",
}
"""Subcommand of ``kd`` -> ``"module:function"`` it runs."""


def resolve(name: str) -> Callable[..., Any]:
    """The function of workflow ``name`` (its module imported now).

    Raises:
        KeyError: ``name`` is not a workflow (the message lists them).

    Example:
        >>> resolve("stage").__name__
        'run_stage'
    """
    if name not in WORKFLOWS:
        raise KeyError(f"`name`: no workflow {name!r}; available: {', '.join(WORKFLOWS)}.")
    module, _, function = WORKFLOWS[name].partition(":")
    return getattr(importlib.import_module(module), function)


def summary_line(name: str) -> str:
    """The first line of workflow ``name``'s docstring, or why it cannot be loaded.

    Example:
        >>> summary_line("members")
        'Train ensemble members of one config one after another (finished members are reused).'
    """
    try:
        function = resolve(name)
    except ModuleNotFoundError as missing:
        return f"(not available here: {missing})"
    return (inspect.getdoc(function) or "").partition("\n")[0]


def _jsonable(value: Any) -> Any:
    """``json.dumps``' fallback for what workflows return: dataclasses, paths."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"a workflow returned a {type(value).__name__}, which has no JSON form.")


def _description(function: Callable[..., Any]) -> str:
    """The docstring up to its first section (``Args:``, ``Returns:``, ...): the arguments are listed apart.

    Example:
        >>> def f(x: int) -> int:
        ...     '''Double it.
        ...
        ...     Args:
        ...         x: a number.
        ...     '''
        >>> _description(f)
        'Double it.'
    """
    kept = []
    for line in (inspect.getdoc(function) or "").splitlines():
        if line.rstrip(":") in _SECTIONS and line.endswith(":"):
            break
        kept.append(line)
    return "\n".join(kept).strip()


_SECTIONS = ("Args", "Returns", "Raises", "Example", "Examples", "Note")


def parser_for(name: str):
    """The jsonargparse parser of ``kd <name>``: the workflow function's parameters, typed and described by
    its signature and docstring."""
    from jsonargparse import ArgumentParser

    function = resolve(name)
    parser = ArgumentParser(
        prog=f"kd {name}",
        description=_description(function),
        epilog="Arguments after `--` are kd arguments for every run (the `overrides`)."
        if "overrides" in inspect.signature(function).parameters
        else None,
    )
    parser.add_function_arguments(function, fail_untyped=True, as_positional=False)
    return parser


def run_workflow(name: str, argv: Sequence[str]) -> Any:
    """Run ``kd <name> ARGV``: parse ``argv`` against the workflow's signature, call it, print its result
    as JSON and return it.

    Raises:
        KeyError: ``name`` is not a workflow.
        SystemExit: ``--help``, or arguments the workflow does not take (jsonargparse's message).
    """
    argv = list(argv)
    parser = parser_for(name)
    if "--" in argv:  # the kd arguments of every run
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
        argv.append("--overrides=" + json.dumps(overrides))
    config = parser.parse_args(argv)
    arguments = parser.instantiate_classes(config).as_dict()
    result = resolve(name)(**arguments)
    print(json.dumps(result, indent=2, ensure_ascii=False, default=_jsonable))
    sys.stdout.flush()
    return result
