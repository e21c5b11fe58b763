"""The quiet CPU Trainer every test uses: no logger, checkpoints, progress bar or summary."""

from __future__ import annotations

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback


class ReleaseProcessGroup(Callback):
    """End a ``ddp_spawn`` worker with its process group destroyed, every rank together.

    A spawned worker that exits with the gloo process group still alive leaves its threads to the
    interpreter's exit, where they are occasionally destroyed while joinable: ``terminate called
    without an active exception`` and a SIGABRT after the work has finished. The ``teardown`` hook is
    the worker's last Lightning call; nothing after it communicates.
    """

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def quiet_trainer(tmp_path, **kwargs) -> L.Trainer:
    """A Trainer on one CPU process writing under ``tmp_path``; ``kwargs`` override any default.

    Under ``strategy="ddp_spawn"`` the workers end with :class:`ReleaseProcessGroup`.
    """
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    options = {**defaults, **kwargs}
    if options.get("strategy") == "ddp_spawn":
        options["callbacks"] = [*options.get("callbacks", []), ReleaseProcessGroup()]
    return L.Trainer(**options)
