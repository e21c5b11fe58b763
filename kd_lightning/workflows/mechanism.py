"""The paper's MNIST experiment (Hinton et al. 2015, section 3) as ``kd`` stages: a teacher better than an
unregularised student *because of* regularisation or augmentation the student does not get, the student
alone, and the student distilled from the teacher's soft targets.

A design is a directory of four shipped configs with fixed names (``configs/mnist1d/``,
``configs/fashion_mnist/``): ``mlp_teacher.yaml``, ``mlp_student.yaml``, ``mlp_distill.yaml`` (its
:class:`~kd_lightning.callbacks.SoftTargetCache` the last callback) and, for the small-data regime,
``mlp_student_early_stopped.yaml``. Every run is a stage (:func:`~kd_lightning.workflows.stage.run_stage`),
reused when finished; every choice is made on the validation split
(:func:`~kd_lightning.workflows.selection.choose_on_validation`); test accuracy is only reported.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd_lightning.workflows.selection import Selection, choose_on_validation
from kd_lightning.workflows.stage import StageResult, run_stage

QUIET = ("--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false")
"""``kd`` arguments that keep bars and summaries out of a workflow's output."""
PAPER_ERRORS = {"teacher": 67, "alone": 146, "distilled": 74}
"""Test errors on MNIST's 10,000 images in the paper (section 3)."""
TEMPERATURE = "--model.init_args.objective.init_args.temperature"
HARD_WEIGHT = "--model.init_args.objective.init_args.hard_weight"


def run_args(seed: int, epochs: int, root: Path, extra: Sequence[str] = ()) -> list[str]:
    """The ``kd`` arguments of one run: its seed, its budget, its run directory, then ``extra``.

    Example:
        >>> run_args(2, 50, Path("/r"), ["--x=1"])
        ['--seed_everything=2', '--trainer.max_epochs=50', '--trainer.default_root_dir=/r', '--x=1']
    """
    return [
        f"--seed_everything={seed}",
        f"--trainer.max_epochs={epochs}",
        f"--trainer.default_root_dir={root}",
        *extra,
    ]


def store_args(store: Path, teacher_checkpoint: str | Path) -> list[str]:
    """``kd`` arguments pointing a distillation config's SoftTargetCache (its last callback) at a store
    and the teacher that fills it."""
    return [f"--trainer.callbacks.path={store}", f"--trainer.callbacks.teacher_ckpt={teacher_checkpoint}"]


def gap_closed(teacher: float, alone: Sequence[float], distilled: Sequence[float]) -> float:
    """Share of the teacher-student accuracy gap that distillation closes, from mean accuracies.

    ``nan`` when the teacher is not better than the student alone (no gap to close).

    Example:
        >>> round(gap_closed(0.8, [0.6, 0.62], [0.75, 0.77]), 3)
        0.789
    """
    a, d = statistics.fmean(alone), statistics.fmean(distilled)
    return (d - a) / (teacher - a) if teacher > a else float("nan")


@dataclass
class GapClosure:
    """The result of :func:`gap_closure`.

    Args:
        teacher: the teacher's selection (candidates, validation scores, chosen run).
        temperature: the temperature's selection (first seed).
        alone: the student alone, one stage per seed.
        distilled: the distilled student at the chosen temperature, one stage per seed (same seeds).
        budget: ``{"epochs": E, "alone": acc, "distilled": acc}`` of the first seed at twice the budget, or empty.
    """

    teacher: Selection
    temperature: Selection
    alone: list[StageResult]
    distilled: list[StageResult]
    budget: dict[str, float] = field(default_factory=dict)

    @property
    def closed(self) -> float:
        """Share of the teacher-student gap closed (mean accuracies over seeds)."""
        return gap_closed(
            self.teacher.result.test_acc,
            [r.test_acc for r in self.alone],
            [r.test_acc for r in self.distilled],
        )

    def record(self) -> dict[str, Any]:
        """A JSON-able summary: choices, scores and every stage's record."""
        return {
            "teacher": {
                "chosen": self.teacher.chosen,
                "scores": self.teacher.scores,
                "result": self.teacher.result.record(),
            },
            "temperature": {"chosen": self.temperature.chosen, "scores": self.temperature.scores},
            "alone": [r.record() for r in self.alone],
            "distilled": [r.record() for r in self.distilled],
            "budget": self.budget,
            "closed": self.closed,
        }


def gap_closure(
    configs: str | Path,
    out: str | Path,
    workdir: str | Path = ".",
    seeds: Sequence[int] = (1, 2, 3),
    teacher_candidates: Mapping[str, Sequence[str]] | None = None,
    temperatures: Sequence[float] = (2.0, 5.0, 10.0, 20.0),
    teacher_epochs: int = 150,
    student_epochs: int = 100,
    check_budget: bool = True,
    overrides: Sequence[str] = QUIET,
    force: bool = False,
) -> GapClosure:
    """Teacher, student alone and distilled student of one design, over seeds.

    1. The teacher's regularisation is chosen on validation among ``teacher_candidates`` (include the
       unregularised one: if it wins, the mechanism's condition does not hold on this data).
    2. The student alone, one stage per seed.
    3. The temperature is chosen on validation (first seed), then run for every seed, with the soft
       targets filled once into a store from the chosen teacher.
    4. With ``check_budget``, the first seed's student alone and distilled again at twice the budget,
       to see whether the verdict still changes with training time.

    Args:
        configs: the design's config directory (``mlp_teacher.yaml``, ``mlp_student.yaml``, ``mlp_distill.yaml``).
        out: directory of every run (relative to ``workdir``).
        workdir: where the configs' relative paths resolve.
        seeds: the students' seeds.
        teacher_candidates: name -> ``kd`` arguments of each teacher candidate; default: the config as is.
        temperatures: the distillation temperatures tried on validation; none: the config's own.
        teacher_epochs: the teacher's budget.
        student_epochs: every student's budget.
        check_budget: run the twice-the-budget check.
        overrides: ``kd`` arguments for every run.
        force: refit finished stages.

    Returns:
        The :class:`GapClosure`.
    """
    configs, root = Path(configs), (Path(workdir) / out).resolve()
    if not seeds:
        raise ValueError("`seeds` is empty: give at least one student seed.")
    teacher = choose_on_validation(
        "teacher",
        configs / "mlp_teacher.yaml",
        {k: list(v) for k, v in (teacher_candidates or {"config": []}).items()},
        root / "teacher",
        workdir,
        [f"--trainer.max_epochs={teacher_epochs}", *overrides],
        force=force,
    )
    alone = [
        run_stage(
            f"alone s{s}",
            configs / "mlp_student.yaml",
            workdir,
            run_args(s, student_epochs, root / "alone", overrides),
            force,
        )
        for s in seeds
    ]
    store = store_args(root / "soft_targets", teacher.result.checkpoint)
    # The first seed's distilled run is the chosen candidate's own (same arguments, same order): reused.
    common = [f"--trainer.max_epochs={student_epochs}", *store, *overrides]
    candidates = {f"T{t:g}": [f"{TEMPERATURE}={t}"] for t in temperatures} or {"config": []}
    temperature = choose_on_validation(
        "temperature",
        configs / "mlp_distill.yaml",
        candidates,
        root / "distilled",
        workdir,
        [f"--seed_everything={seeds[0]}", *common],
        force=force,
    )
    chosen = candidates[temperature.chosen]
    distilled = [
        run_stage(
            f"distilled s{s}",
            configs / "mlp_distill.yaml",
            workdir,
            [
                f"--seed_everything={s}",
                *common,
                *chosen,
                f"--trainer.default_root_dir={root / 'distilled' / temperature.chosen}",
            ],
            force,
        )
        for s in seeds
    ]
    budget: dict[str, float] = {}
    if check_budget:
        epochs, s = 2 * student_epochs, seeds[0]
        long_alone = run_stage(
            f"alone s{s} x2",
            configs / "mlp_student.yaml",
            workdir,
            run_args(s, epochs, root / "budget" / "alone", overrides),
            force,
        )
        long_distilled = run_stage(
            f"distilled s{s} x2",
            configs / "mlp_distill.yaml",
            workdir,
            run_args(s, epochs, root / "budget" / "distilled", [*store, *chosen, *overrides]),
            force,
        )
        budget = {"epochs": epochs, "alone": long_alone.test_acc, "distilled": long_distilled.test_acc}
    return GapClosure(teacher, temperature, alone, distilled, budget)
