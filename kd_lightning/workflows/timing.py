"""What the timing workflows share (:mod:`~kd_lightning.workflows.cache_timing`,
:mod:`~kd_lightning.workflows.gpu_benchmark`): a Trainer that only trains, and a device barrier."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


def training_only_trainer(
    *,
    accelerator: str,
    precision: str,
    max_epochs: int,
    limit_train_batches: int | float | None,
    callbacks: list[L.Callback],
    default_root_dir: str | Path,
) -> L.Trainer:
    """A Trainer on one device that trains and does nothing else: no validation (no sanity check either),
    no logger, checkpoints, progress bar or model summary."""
    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_epochs=max_epochs,
        limit_train_batches=limit_train_batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=default_root_dir,
    )


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a CUDA device; nothing to wait for elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
