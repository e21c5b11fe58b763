"""The KD benchmark's students: one Fashion-MNIST teacher, students trained alone and distilled per seed.

Two regimes (:data:`REGIMES`): ``full`` (the 55,000 training images, the config's 15 epochs) and
``transfer10`` (a fixed 10% of them, 30 epochs: Hinton et al.'s section 6, soft targets as a regulariser
when labelled data is scarce). The students are configs/fashion_mnist/student.yaml and
distill_cached.yaml: the same 800-800 MLP, optimizer, schedule and epochs; only the loss differs.
scripts/benchmark_kd.py prints them; the reproduction reuses the same runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kd_lightning.workflows import CONFIGS
from kd_lightning.workflows.stage import StageResult, run_stage

REGIMES: dict[str, list[str]] = {
    "full": [],
    "transfer10": ["--data.init_args.train_fraction=0.1", "--trainer.max_epochs=30"],
}
"""Regime name -> the ``kd`` arguments that make it."""


def run_regime(
    regime: str,
    seeds: list[int],
    teacher: StageResult,
    workdir: Path,
    overrides: Sequence[str] = (),
    force: bool = False,
) -> tuple[list[StageResult], list[StageResult]]:
    """The students of one regime, alone and distilled, one per seed; finished runs are reused.

    Args:
        regime: a key of :data:`REGIMES`.
        seeds: one student of each kind per seed (``--seed_everything``).
        teacher: the teacher's stage; its checkpoint fills the soft-target store (once, for every run).
        workdir: runs go to ``workdir/runs/benchmark_kd/<regime>/seed<seed>``, the store to
            ``workdir/runs/benchmark_kd/soft_targets``.
        overrides: ``kd`` arguments for every student.
        force: recompute finished runs.

    Returns:
        The students trained alone and the distilled ones, in the order of ``seeds``.

    Raises:
        KeyError: ``regime`` is not one of :data:`REGIMES`.
    """
    if regime not in REGIMES:
        raise KeyError(f"`regime`: expected one of {list(REGIMES)}, got {regime!r}.")
    configs = CONFIGS / "fashion_mnist"
    # One store for every distilled run: the teacher runs once for the whole benchmark.
    store = workdir / "runs" / "benchmark_kd" / "soft_targets"
    from_store = [
        f"--trainer.callbacks.path={store}",
        f"--trainer.callbacks.teacher_ckpt={teacher.checkpoint}",
    ]
    alone, distilled = [], []
    for seed in seeds:
        seed_dir = workdir / "runs" / "benchmark_kd" / regime / f"seed{seed}"
        common = [f"--seed_everything={seed}", *REGIMES[regime], *overrides]
        alone.append(run_stage(f"alone s{seed}", configs / "student.yaml", seed_dir, common, force))
        distilled.append(
            run_stage(
                f"distilled s{seed}", configs / "distill_cached.yaml", seed_dir, [*common, *from_store], force
            )
        )
    return alone, distilled
