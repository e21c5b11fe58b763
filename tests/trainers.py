"""The quiet CPU Trainer every test uses: no logger, checkpoints, progress bar or summary."""

from __future__ import annotations

import lightning as L


def quiet_trainer(tmp_path, **kwargs) -> L.Trainer:
    """A Trainer on one CPU process writing under ``tmp_path``; ``kwargs`` override any default."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kwargs})
