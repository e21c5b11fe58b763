"""The ``kd`` command: a LightningCLI whose models and data are chosen by ``class_path``.

The DataModule's ``num_classes`` and ``input_shape`` are linked into the model, so a config never
repeats them. This module is the one place in ``kd_lightning`` that imports ``datamodules`` and
``callbacks``: importing them registers their classes for ``class_path`` and for checkpoint reloads.

One run, one directory (:func:`place_run`): the run directory is ``<trainer.default_root_dir>/seed<seed>``
and becomes ``trainer.default_root_dir``; a ModelCheckpoint without a ``dirpath`` writes to
``<run dir>/checkpoints``, a KDWandbLogger without a ``save_dir`` logs to the run directory, named
``[<job_type>-]<root name>-seed<seed>`` unless named, and a CSVLogger writes ``<run dir>/csv/``. Every run gets a :class:`~kd_lightning.callbacks.RunIdentity` (the ``--run.*``
arguments): it refuses to overwrite another run's checkpoints (``--run.overwrite=true`` allows it) and
saves ``last.ckpt`` on SIGTERM. ``--ckpt_path last`` resumes from the run's newest ``last*.ckpt`` or
``hpc_ckpt_*.ckpt`` and continues the same W&B run. See docs/resume.md.

Besides ``fit``, ``validate``, ``test`` and ``predict``, ``kd <workflow> ...`` runs one of the library's
workflows (:data:`kd_lightning.workflows.WORKFLOWS`: ``stage``, ``members``, ``specialists``, ...) with
arguments taken from the function's signature and docstring (:func:`console`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

import kd_lightning.callbacks  # noqa: F401  (registers callbacks for class_path)
import kd_lightning.datamodules
import kd_lightning.ensemble  # noqa: F401
import kd_lightning.modules  # noqa: F401  (checkpoints reload only already-imported classes)
import kd_lightning.resnets  # noqa: F401  (its networks are listed in the help of network arguments)
import kd_lightning.specialists  # noqa: F401
from kd_lightning.callbacks.run_identity import (
    HPC_PREFIX,
    RunIdentity,
    last_checkpoint,
    read_run_record,
    run_directory,
    run_name,
)
from kd_lightning.cli_errors import BuildError, failing_argument
from kd_lightning.cli_help import DEBUG_VARIABLE, EXAMPLES, KDArgumentParser, debug_enabled
from kd_lightning.launch import check_trainer_arguments
from kd_lightning.loggers import KDSaveConfigCallback, KDWandbLogger  # registers KDWandbLogger for class_path
from kd_lightning.progress import PlainProgress, wants_plain_progress
from kd_lightning.shipped import copy_configs


def _class_of(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _class_args(value: Any) -> list[Namespace]:
    """The ``class_path``/``init_args`` entries of a callbacks or logger setting (one, a list, or none)."""
    items = value if isinstance(value, list) else [value]
    return [item for item in items if isinstance(item, Namespace) and "class_path" in item]


def place_run(config: Namespace) -> Path:
    """Derive the run's directories from ``trainer.default_root_dir`` and ``seed_everything`` (in place).

    ``trainer.default_root_dir`` becomes the run directory (:func:`~kd_lightning.callbacks.run_identity.run_directory`),
    ModelCheckpoints without a ``dirpath`` write to ``<run dir>/checkpoints``, CSVLoggers with a relative
    ``save_dir`` write under the run directory (``save_dir: .`` is the run directory), KDWandbLoggers without a
    ``save_dir`` log to the run directory (named by :func:`~kd_lightning.callbacks.run_identity.run_name` unless named), a CSVLogger is added
    beside the others (:func:`add_csv_logger`), and ``run.run_dir``/``run.seed`` record it. Paths given
    explicitly are kept.

    Returns:
        The run directory.
    """
    given = config.seed_everything  # an int once LightningCLI has drawn a seed for `true`; `false`: none
    seed = given if isinstance(given, int) and not isinstance(given, bool) else None
    trainer = config.trainer
    root = Path(trainer.default_root_dir or ".")
    run_dir = run_directory(root, seed)
    trainer.default_root_dir = str(run_dir)
    for callback in _class_args(trainer.callbacks):
        if issubclass(_class_of(callback.class_path), ModelCheckpoint) and callback.init_args.dirpath is None:
            callback.init_args.dirpath = str(run_dir / "checkpoints")
    for logger in _class_args(trainer.logger):
        if issubclass(_class_of(logger.class_path), CSVLogger):
            save_dir = Path(logger.init_args.save_dir)
            if not save_dir.is_absolute():
                logger.init_args.save_dir = str(run_dir / save_dir)
        if issubclass(_class_of(logger.class_path), KDWandbLogger):
            if logger.init_args.save_dir is None:
                logger.init_args.save_dir = str(run_dir)
            if logger.init_args.name is None:
                root_name = run_dir.parent.name or run_dir.resolve().parent.name
                logger.init_args.name = run_name(root_name, seed, logger.init_args.job_type)
    add_csv_logger(trainer, run_dir)
    config.run.run_dir, config.run.seed = str(run_dir), seed
    return run_dir


def add_csv_logger(trainer: Namespace, run_dir: Path) -> None:
    """Log to ``<run_dir>/csv/version_N/metrics.csv`` beside the configured loggers (W&B), so that a run's
    metrics can be read without W&B: a CSVLogger is appended to ``trainer.logger`` when it names loggers
    and none is a CSVLogger (``logger: false`` stays without loggers; a config's own CSVLogger is kept).
    """
    entries = _class_args(trainer.logger)
    if not entries or any(issubclass(_class_of(e.class_path), CSVLogger) for e in entries):
        return
    csv = Namespace(class_path="lightning.pytorch.loggers.CSVLogger")
    # Absolute: a relative `save_dir` is read against the run directory (a rerun of the saved config).
    csv.init_args = Namespace(save_dir=str(run_dir.absolute()), name="csv")
    trainer.logger = [*entries, csv]


class KDCLI(LightningCLI):
    """LightningCLI with the DataModule's shape linked into the model and one directory per run."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")
        # A specialist's group belongs to its data (SpecialistDataModule); for other data or models these
        # links do nothing (the source attribute or the target argument is absent).
        parser.link_arguments("data.group_classes", "model.init_args.classes", apply_on="instantiate")
        parser.link_arguments("data.group", "model.init_args.group", apply_on="instantiate")
        parser.link_arguments("data.groups_file", "model.init_args.groups_file", apply_on="instantiate")
        # Always added to the Trainer's callbacks; `--run.overwrite=true` is the flag users give.
        parser.add_lightning_class_args(RunIdentity, "run")

    def before_instantiate_classes(self) -> None:
        place_run(self.config[self.subcommand] if self.subcommand else self.config)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        given = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        # Checked as given: Lightning silently turns 16-mixed into bf16 on CPU and takes SLURM's world size.
        check_trainer_arguments(given)
        if wants_plain_progress(given):  # stdout is a file (SLURM, `> log`): lines, not a redrawn bar
            callbacks = given.get("callbacks") or []
            kwargs["callbacks"] = [
                *(callbacks if isinstance(callbacks, list) else [callbacks]),
                PlainProgress(),
            ]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        """Resolve ``--ckpt_path last`` to the run's newest checkpoint and continue its W&B run.

        Raises:
            FileExistsError: the fit would overwrite another run's checkpoint (before anything is logged).
        """
        for callback in self.trainer.callbacks:
            if isinstance(callback, RunIdentity):
                callback.check(self.trainer)
        config = self.config_init[self.subcommand]
        checkpoint = resume_checkpoint(self.trainer, config.ckpt_path)
        if checkpoint is None:
            if config.ckpt_path == "last":
                # A first start (a job file always asks for `last`): say so plainly, naming where it looked.
                rank_zero_info(
                    f"--ckpt_path last: no checkpoint to resume in {self.trainer.default_root_dir!r} yet "
                    "(last*.ckpt beside the run's checkpoints, hpc_ckpt_*.ckpt); this fit starts from scratch."
                )
                config.ckpt_path = None
            return
        if config.ckpt_path == "last":
            config.ckpt_path = str(checkpoint)  # also an hpc_ckpt newer than last.ckpt, which Lightning skips
        continue_wandb_run(self.trainer, checkpoint)


def resume_checkpoint(trainer: L.Trainer, ckpt_path: str | None) -> Path | None:
    """The checkpoint a fit with ``ckpt_path`` resumes from: ``"last"`` as :func:`last_checkpoint`, a path as
    given, and without one under SLURM the ``hpc_ckpt`` that Lightning resumes from; ``None`` otherwise."""
    if ckpt_path == "last":
        return last_checkpoint(trainer)
    if ckpt_path is None:
        if not SLURMEnvironment.detect():
            return None
        # Lightning's own choice under SLURM: the highest hpc_ckpt_<n>.ckpt of the root directory.
        hpc = Path(trainer.default_root_dir).glob(f"{HPC_PREFIX}*.ckpt")
        versions = {
            int(p.stem.removeprefix(HPC_PREFIX)): p for p in hpc if p.stem.removeprefix(HPC_PREFIX).isdigit()
        }
        return versions[max(versions)] if versions else None
    return None if ckpt_path in ("best", "hpc", "registry") else Path(ckpt_path)


def continue_wandb_run(trainer: L.Trainer, checkpoint: Path) -> str | None:
    """Make the trainer's KDWandbLoggers continue the W&B run recorded in ``checkpoint`` when it is this
    run's own (same run directory and seed); returns that run id, or ``None`` (a new W&B run)."""
    identity = next((c for c in trainer.callbacks if isinstance(c, RunIdentity)), None)
    if identity is None or not checkpoint.is_file():
        return None
    record = read_run_record(checkpoint) or {}
    mine = identity.identity(trainer)
    run_id = record.get("wandb_id")
    if run_id is None or {k: record.get(k) for k in mine} != mine:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, KDWandbLogger):
            logger.resume_run(run_id)
    return run_id


def main(args: list[str] | None = None, run: bool = True) -> KDCLI:
    """Entry point of ``kd``; ``args`` and ``run`` let scripts and tests call it in-process."""
    return KDCLI(**_cli_arguments(), args=args, run=run)


def _cli_arguments() -> dict[str, Any]:
    return dict(
        # kd's description, "known subclasses" lists cut to kd-lightning's classes, parse errors in two lines.
        parser_class=KDArgumentParser,
        model_class=L.LightningModule,
        datamodule_class=kd_lightning.datamodules.IndexedDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # Optimizers are module arguments built over the trainable network only; LightningCLI's
        # automatic `--optimizer` would build one over every parameter, a frozen teacher included.
        auto_configure_optimizers=False,
        # A rerun in the same directory replaces the saved config instead of refusing to start.
        save_config_kwargs={"overwrite": True},
        # Also stores the full resolved config with each W&B run (its own copy, whatever the next run
        # in the same directory writes to config.yaml).
        save_config_callback=KDSaveConfigCallback,
    )


class _ParseOnly(KDCLI):
    """The ``kd`` parser without building anything (no run placement, no instantiation)."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def parse_config(args: list[str]) -> Namespace:
    """The configuration ``kd fit ARGS`` would run (config files and overrides merged and type-checked, as
    ``kd`` itself reads them), without building the model, data or Trainer and without placing the run
    (``trainer.default_root_dir`` as given). Like ``kd``, it seeds the global random generators.

    Example:
        >>> parse_config(["--model=kd_lightning.modules.ClassifierModule", "--model.init_args.net=kd_lightning.models.MLP",
        ...     "--data=kd_lightning.datamodules.IndexedDataModule", "--data.init_args.source=kd_lightning.datamodules.Synthetic",
        ...     "--trainer.default_root_dir=runs/x"]).trainer.default_root_dir
        'runs/x'
    """
    return _ParseOnly(**_cli_arguments(), args=args, run=False).config


class _ConsoleCLI(KDCLI):
    """``kd`` as run from a shell: an error while building the configured classes, or while setting up before
    the first training step, is raised as a :class:`~kd_lightning.cli_errors.BuildError` naming the argument
    at fault (``console`` prints it in two lines); ``KD_DEBUG=1`` leaves every error as it was raised.
    :func:`main` (scripts, workflows, tests) keeps the original exceptions."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as error:
            if debug_enabled():
                raise
            config = self.config[self.subcommand] if self.subcommand else self.config
            raise BuildError(failing_argument(error, config), error) from error

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            raise
        except Exception as error:
            # Only before anything trained (data not found, a network that cannot take the data, ...), and
            # only when a configured class is at fault: a later error keeps its traceback for the log.
            argument = (
                None
                if debug_enabled() or self.trainer.global_step
                else failing_argument(error, self.config[subcommand])
            )
            if argument is None:
                raise
            raise BuildError(argument, error, stage="setting up") from error


def _workflow_lines() -> list[str]:
    from kd_lightning.workflows import WORKFLOWS, summary_line

    width = max(len(name) for name in WORKFLOWS)
    return [f"  {name:<{width}}  {summary_line(name)}" for name in WORKFLOWS]


def console(argv: list[str] | None = None) -> None:
    """The ``kd`` console script (also ``python -m kd_lightning``): ``kd fit|validate|test|predict ...``
    (LightningCLI), ``kd <workflow> ...`` (:mod:`kd_lightning.workflows`), ``kd configs [DEST]`` (copy the
    shipped configs out), ``kd --version``, ``kd --help``. A first argument ``--debug`` sets ``KD_DEBUG=1``.

    Exit status 0 on success (``sys.exit(main())`` would print the CLI object and exit 1), 143
    (128 + SIGTERM) for a fit stopped by SIGTERM: Lightning ends it with a ``SystemExit`` without a
    status, which would read as success to a shell or a SLURM job (a workflow's fits likewise). An unknown
    subcommand exits with 2, naming the available ones; no subcommand prints the help and exits with 2;
    an argument that does not parse exits with 2 and a configured class that fails to build (or finds no
    data) with 1, each in two lines on stderr (:func:`report_error`; ``KD_DEBUG=1`` for the traceback).
    """
    from kd_lightning.workflows import WORKFLOWS, run_workflow

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--debug"]:
        os.environ[DEBUG_VARIABLE] = "1"
        argv = argv[1:]
    lightning = ("fit", "validate", "test", "predict")
    if argv[:1] in (["--version"], ["-V"]):
        print(f"kd-lightning {kd_lightning.__version__}")
        sys.exit(0)
    if not argv or argv[0] in ("-h", "--help"):
        print_help()
        sys.exit(0 if argv else 2)
    if argv[0] == "configs":
        copy_configs_command(argv[1:])
        return
    if not argv[0].startswith("-") and argv[0] not in (*lightning, *WORKFLOWS):
        print(
            f"kd: unknown subcommand {argv[0]!r}; available: {', '.join([*lightning, *WORKFLOWS, 'configs'])} "
            "(kd --help describes them).",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        if argv[0] in WORKFLOWS:
            run_workflow(argv[0], argv[1:])
        else:
            with process_argv(argv):  # `--debug` taken out
                _ConsoleCLI(**_cli_arguments())
    except SIGTERMException:
        sys.exit(128 + signal.SIGTERM)
    except BuildError as error:
        report_error(argv[0], error)
        sys.exit(1)


@contextmanager
def process_argv(argv: list[str]) -> Iterator[None]:
    """Make ``sys.argv`` the program followed by ``argv`` while a Lightning subcommand runs, then restore it.

    LightningCLI reads ``sys.argv``, and Lightning's DDP launcher starts the other ranks by running
    ``sys.argv`` again: hiding the arguments would start those ranks without any.
    """
    saved = sys.argv
    sys.argv = [saved[0], *argv]
    try:
        yield
    finally:
        sys.argv = saved


def print_help() -> None:
    """``kd --help``: kd-lightning's description and LightningCLI's subcommands, the workflows, ``kd configs``
    and examples (:data:`~kd_lightning.cli_help.EXAMPLES`)."""
    from kd_lightning.workflows.stage import own_argv

    try:
        with own_argv():
            main(["--help"])
    except SystemExit as done:  # LightningCLI printed its help; the workflows follow
        if done.code not in (0, None):
            raise
    print("\nworkflows (kd <workflow> --help for their arguments):\n" + "\n".join(_workflow_lines()))
    print("\nconfigs:\n  kd configs [DEST]  copy the shipped configs into DEST (default: ./configs)")
    print("\n" + EXAMPLES)


def copy_configs_command(argv: list[str]) -> None:
    """``kd configs [DEST] [--overwrite]``: :func:`~kd_lightning.shipped.copy_configs`, then one line naming
    what was written; exit status 1, with the reason, when a file exists or no configs are installed."""
    parser = argparse.ArgumentParser(
        prog="kd configs", description=(copy_configs.__doc__ or "").partition("\n")[0]
    )
    parser.add_argument("dest", nargs="?", default="configs", help="folder to copy into (default: configs)")
    parser.add_argument("--overwrite", action="store_true", help="replace configs that exist in DEST")
    options = parser.parse_args(argv)
    try:
        written = copy_configs(options.dest, overwrite=options.overwrite)
    except (FileExistsError, FileNotFoundError) as error:
        print(f"kd configs: error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"{len(written)} configs written under {options.dest}/, e.g. kd fit --config {written[0]}")


def report_error(subcommand: str, error: BuildError) -> None:
    """Print ``error`` in two lines on stderr: what failed, and how to see the full traceback."""
    print(
        f"kd {subcommand}: error: {error}\n(the full traceback: KD_DEBUG=1 kd ... or kd --debug {subcommand} ...)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    console()
