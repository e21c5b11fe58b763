"""Soft targets as a regulariser (Hinton et al. 2015, section 6) as ``kd`` stages.

The paper trained its speech model on 3% of the data: with hard targets it overfitted sharply and,
early-stopped, reached 44.5% (58.9% on all the data); with the soft targets of the model trained on all
the data it reached 57.0% without early stopping, recovering most of the gap. Here: the student config
on a fraction of the training split with hard labels, early-stopped on validation (its config's
checkpoint keeps the best validation epoch), against the distillation config on the same fraction,
learning the soft targets of the model trained on all of it with hard labels, not early-stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kd_lightning.workflows.mechanism import QUIET, TEMPERATURE, run_args, store_args
from kd_lightning.workflows.stage import run_stage

PAPER = {"full hard": 58.9, "small hard": 44.5, "small soft": 57.0}
"""Test frame accuracy (%) of the paper's speech models (section 6)."""


def recovered(full: float, small_hard: float, small_soft: float) -> float:
    """Share of the gap between the small hard-target model and the full-data one that soft targets recover.

    Example:
        >>> round(recovered(PAPER["full hard"], PAPER["small hard"], PAPER["small soft"]), 3)
        0.868
    """
    return (small_soft - small_hard) / (full - small_hard) if full > small_hard else float("nan")


def small_data(
    early_stopped_config: str | Path,
    distill_config: str | Path,
    full_data_checkpoint: str | Path,
    out: str | Path,
    workdir: str | Path = ".",
    fraction: float = 0.03,
    epochs: int = 300,
    temperature: float = 20.0,
    seeds: Sequence[int] = (1, 2, 3),
    overrides: Sequence[str] = QUIET,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Hard targets (early-stopped) against soft targets on ``fraction`` of the training split, per seed.

    Args:
        early_stopped_config: the student with hard labels whose checkpoint keeps its best validation epoch.
        distill_config: the same student distilled (its SoftTargetCache the last callback).
        full_data_checkpoint: the model trained on all the training data with hard labels: the soft targets' source.
        out: directory of the runs and of the store (relative to ``workdir``).
        workdir: where the configs' relative paths resolve.
        fraction: share of the training split both students see (the same examples: ``train_fraction`` draws them
            with the data's split seed).
        epochs: budget of both (the hard-target one keeps its best epoch).
        temperature: the distillation temperature.
        seeds: one pair of students per seed.
        overrides: ``kd`` arguments for every run.
        force: refit finished stages.

    Returns:
        One row per seed: ``{"seed", "hard": test acc, "soft": test acc, "hard_best_val", "soft_val"}``.
    """
    root = (Path(workdir) / out).resolve()
    subset = [f"--data.init_args.train_fraction={fraction}"]
    store = store_args(root / "soft_targets", full_data_checkpoint)
    rows = []
    for seed in seeds:
        hard = run_stage(
            f"{fraction:.0%} hard s{seed}",
            early_stopped_config,
            workdir,
            run_args(seed, epochs, root / "hard", [*subset, *overrides]),
            force,
        )
        soft = run_stage(
            f"{fraction:.0%} soft s{seed}",
            distill_config,
            workdir,
            run_args(
                seed, epochs, root / "soft", [*subset, *store, f"{TEMPERATURE}={temperature}", *overrides]
            ),
            force,
        )
        rows.append(
            {
                "seed": seed,
                "hard": hard.test_acc,
                "soft": soft.test_acc,
                "hard_best_val": hard.metrics["val/acc"],
                "soft_val": soft.metrics["val/acc"],
            }
        )
    return rows
