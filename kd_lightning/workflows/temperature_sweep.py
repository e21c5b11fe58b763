"""The paper's temperature sweep (Hinton et al. 2015, section 3) as ``kd`` stages: a large and a tiny student
distilled at each temperature from one teacher's soft-target store, at one or more budgets.

The paper: with 300 or more units per hidden layer all temperatures above 8 gave similar results; with
30 units per layer, temperatures of 2.5-4 worked significantly better than higher or lower ones. Running
the sweep at two budgets says whether its verdict still depends on training time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kd_lightning.workflows.mechanism import QUIET, TEMPERATURE, run_args, store_args
from kd_lightning.workflows.stage import run_stage

HIDDEN = "--model.init_args.student.init_args.hidden"
STUDENTS = {"large": [256, 256], "tiny": [30, 30]}
"""Student name -> hidden layer widths (the paper's 800-800 and 30-30, scaled to MNIST-1D's signals)."""


def temperature_sweep(
    distill_config: str | Path,
    teacher_checkpoint: str | Path,
    out: str | Path,
    workdir: str | Path = ".",
    students: Mapping[str, Sequence[int]] = STUDENTS,
    temperatures: Sequence[float] = (1.0, 2.0, 3.0, 4.0, 8.0, 20.0),
    budgets: Sequence[int] = (50, 100),
    seeds: Sequence[int] = (1,),
    overrides: Sequence[str] = QUIET,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Distil every student at every temperature, budget and seed; one row per run.

    Args:
        distill_config: the distillation config (its SoftTargetCache the last callback).
        teacher_checkpoint: the teacher whose soft targets every run learns from (one store, filled once).
        out: directory of the runs and the store (relative to ``workdir``).
        workdir: where the config's relative paths resolve.
        students: name -> hidden layer widths.
        temperatures: the temperatures.
        budgets: epochs of each run.
        seeds: seeds of each setting.
        overrides: ``kd`` arguments for every run.
        force: refit finished stages.

    Returns:
        Rows ``{"student", "hidden", "T", "epochs", "seed", "val_acc", "test_acc"}``.

    Raises:
        ValueError: an empty ``students``, ``temperatures``, ``budgets`` or ``seeds``; a temperature <= 0 or a
            budget below one epoch (before anything runs).
    """
    for name, given in (
        ("students", students),
        ("temperatures", temperatures),
        ("budgets", budgets),
        ("seeds", seeds),
    ):
        if not given:
            raise ValueError(f"`{name}` is empty: give at least one.")
    if min(temperatures) <= 0 or min(budgets) < 1:
        raise ValueError(
            f"`temperatures` must be > 0 and `budgets` >= 1 epoch, got {list(temperatures)} and {list(budgets)}."
        )
    root = (Path(workdir) / out).resolve()
    store = store_args(root / "soft_targets", teacher_checkpoint)
    rows = []
    for name, hidden in students.items():
        for epochs in budgets:
            for t in temperatures:
                for seed in seeds:
                    widths = "[" + ",".join(str(h) for h in hidden) + "]"
                    result = run_stage(
                        f"{name} T{t:g} {epochs}ep s{seed}",
                        distill_config,
                        workdir,
                        run_args(
                            seed,
                            epochs,
                            root / f"{name}_{epochs}ep" / f"T{t:g}",
                            [*store, f"{HIDDEN}={widths}", f"{TEMPERATURE}={t}", *overrides],
                        ),
                        force,
                    )
                    rows.append(
                        {
                            "student": name,
                            "hidden": list(hidden),
                            "T": t,
                            "epochs": epochs,
                            "seed": seed,
                            "val_acc": result.metrics["val/acc"],
                            "test_acc": result.test_acc,
                        }
                    )
    return rows


def best_temperatures(
    rows: Sequence[Mapping[str, Any]], metric: str = "val_acc"
) -> dict[tuple[str, int], float]:
    """(student, epochs) -> the temperature of highest mean ``metric`` over seeds (ties: the lower T).

    Example:
        >>> rows = [{"student": "a", "epochs": 5, "T": t, "seed": 0, "val_acc": v} for t, v in [(1, .5), (4, .7), (8, .7)]]
        >>> best_temperatures(rows)
        {('a', 5): 4}
    """
    means: dict[tuple[str, int], dict[float, list[float]]] = {}
    for r in rows:
        means.setdefault((r["student"], r["epochs"]), {}).setdefault(r["T"], []).append(r[metric])
    return {key: min(by_t, key=lambda t: (-sum(by_t[t]) / len(by_t[t]), t)) for key, by_t in means.items()}
