"""The ``kd`` command: a LightningCLI whose models and data are chosen by ``class_path``.

The DataModule's ``num_classes`` and ``input_shape`` are linked into the model, so a config never
repeats them. This module is the one place in ``kd_lightning`` that imports ``datamodules`` and
``callbacks``: importing them registers their classes for ``class_path`` and for checkpoint reloads.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import callbacks  # noqa: F401  (registers callbacks for class_path)
import datamodules
import kd_lightning.ensemble  # noqa: F401
import kd_lightning.modules  # noqa: F401  (checkpoints reload only already-imported classes)
import kd_lightning.specialists  # noqa: F401
from kd_lightning.launch import check_trainer_arguments
from kd_lightning.loggers import KDSaveConfigCallback  # also registers KDWandbLogger for class_path


class KDCLI(LightningCLI):
    """LightningCLI with the DataModule's shape linked into the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        # Checked as given: Lightning silently turns 16-mixed into bf16 on CPU and takes SLURM's world size.
        check_trainer_arguments({**self._get(self.config_init, "trainer", default={}), **kwargs})
        return super().instantiate_trainer(**kwargs)


def main(args: list[str] | None = None, run: bool = True) -> KDCLI:
    """Entry point of ``kd``; ``args`` and ``run`` let scripts and tests call it in-process."""
    return KDCLI(
        L.LightningModule,
        datamodules.IndexedDataModule,
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
        args=args,
        run=run,
    )


def console() -> None:
    """The ``kd`` console script: exit status 0 on success (``sys.exit(main())`` would print the CLI
    object and exit 1)."""
    main()


if __name__ == "__main__":
    main()
