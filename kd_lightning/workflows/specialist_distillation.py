"""Distil a generalist and its specialists, combined, into one student of the generalist's size, and measure
the share of the combination's gain over the generalist that the student keeps.

In the capacity study's conditions (:mod:`~kd_lightning.workflows.capacity_study`: a 16-unit MLP generalist
on 100 confusable classes, overlapping groups, specialists in the shipped setting), for each seed, in
``<workdir>/seed<seed>/`` (the capacity study's own directories, so its finished runs are reused):

1. the generalist and its specialists, and the KL combination's test accuracy
   (:func:`~kd_lightning.workflows.capacity_study.specialists_run`);
2. on the first seed only, the distillation's setting chosen among ``candidates`` on the *validation*
   split (:func:`~kd_lightning.workflows.selection.choose_on_validation`); the choice holds for every seed;
3. a student with the generalist's network and recipe (``configs/synthetic/distill_specialists.yaml``)
   trained on the combination's soft targets: the :class:`~kd_lightning.specialists.SpecialistTeacher` fills
   the config's soft-target store once per seed, and the student (and every candidate) reads it.

Share kept = (student - generalist) / (combination - generalist), per seed and of the means. The generalist
is the student alone: the same network, recipe and budget on hard labels.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

from kd_lightning.workflows import CONFIGS
from kd_lightning.workflows.capacity_study import (
    DEFAULT_SETTING,
    QUIET,
    specialists_run,
    train_generalist,
)
from kd_lightning.workflows.ensemble_distillation import distillation_candidates, share_kept
from kd_lightning.workflows.selection import choose_on_validation
from kd_lightning.workflows.stage import StageResult, run_stage

DISTILL_CONFIG = CONFIGS / "synthetic" / "distill_specialists.yaml"
"""The student: the generalist's MLP and recipe, taught by the generalist + specialists through a store."""
TEACHER = "--model.init_args.teacher.init_args"
SETTING_NAME = "chosen"
"""The specialists' directory under ``seed<seed>/specialists/`` (the capacity study's)."""
DEFAULT_CANDIDATES = distillation_candidates([1.0, 2.0, 4.0], [0.5])
"""Temperatures 1, 2 and 4 at hard-label weight 0.5, chosen on the first seed's validation split."""

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class SeedDistillation:
    """One seed: test accuracies in [0, 1] and the runs' checkpoints.

    Args:
        seed: the seed of the generalist, its specialists and the student.
        generalist: the generalist's test accuracy (the student alone).
        combination: the generalist + specialists' KL combination's test accuracy.
        student: the distilled student's test accuracy.
        agreement: the student's top-1 agreement with the combination on the test split.
        student_checkpoint: the student's checkpoint.
        teacher_arguments: the ``kd`` arguments that name the teacher (generalist, specialists, groups).
        gain: combination - generalist.
        kept: (student - generalist) / gain.
    """

    seed: int
    generalist: float
    combination: float
    student: float
    agreement: float
    student_checkpoint: str
    teacher_arguments: list[str]
    gain: float = field(init=False)
    kept: float = field(init=False)

    def __post_init__(self) -> None:
        self.gain = self.combination - self.generalist
        self.kept = share_kept(self.student, self.generalist, self.combination)


@dataclass
class SpecialistDistillation:
    """The outcome of :func:`distil_specialists`.

    Args:
        setting: the specialists' setting.
        chosen: the chosen candidate (``"config"`` when there was no choice).
        chosen_arguments: its ``kd`` arguments, given to every student.
        scores: candidate -> validation accuracy (first seed).
        seeds: one :class:`SeedDistillation` per seed.
        share_kept: the share kept of the means over seeds.
    """

    setting: dict[str, Any]
    chosen: str
    chosen_arguments: list[str]
    scores: dict[str, float]
    seeds: list[SeedDistillation]
    share_kept: float = field(init=False)

    def __post_init__(self) -> None:
        mean = statistics.fmean
        self.share_kept = share_kept(
            mean(s.student for s in self.seeds),
            mean(s.generalist for s in self.seeds),
            mean(s.combination for s in self.seeds),
        )


def teacher_arguments(generalist_ckpt: str | Path, specialists: str | Path, groups: int) -> list[str]:
    """The ``kd`` arguments naming a generalist, the specialists ``group<G>.ckpt`` of a directory and its
    ``groups.json`` as the student's teacher.

    Example:
        >>> teacher_arguments("/w/g.ckpt", "/w/s", 2)[1]
        '--model.init_args.teacher.init_args.specialist_ckpts=[/w/s/group0.ckpt,/w/s/group1.ckpt]'
    """
    out = Path(specialists)
    checkpoints = ",".join(str(out / f"group{g}.ckpt") for g in range(groups))
    return [
        f"{TEACHER}.generalist_ckpt={generalist_ckpt}",
        f"{TEACHER}.specialist_ckpts=[{checkpoints}]",
        f"{TEACHER}.groups_file={out / 'groups.json'}",
    ]


def _teacher(seed: int, workdir: Path, setting: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Step 1 for one seed: the generalist, its specialists (reused when finished) and the combination."""
    generalist = train_generalist(seed, workdir, overrides)
    report = specialists_run(seed, workdir, setting, "test", overrides, SETTING_NAME)
    specialists = workdir / f"seed{seed}" / "specialists" / SETTING_NAME
    return {
        "generalist": report["acc"]["generalist"],
        "combination": report["acc"]["kl"],
        "teacher": teacher_arguments(generalist.checkpoint, specialists, len(report["groups"])),
    }


def _student(seed: int, workdir: Path, config: Path, arguments: Sequence[str]) -> StageResult:
    """Step 3 for one seed: the distilled student (reused when finished)."""
    return run_stage(
        f"student of generalist + specialists (seed {seed})",
        config,
        Path(workdir) / f"seed{seed}",
        [f"--seed_everything={seed}", *QUIET, *arguments],
    )


def _map(function: Callable[[T], R], items: Sequence[T], jobs: int) -> list[R]:
    """``function`` over ``items``, in ``jobs`` fresh processes (``spawn``) when ``jobs > 1``, in order."""
    if jobs <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    with ProcessPoolExecutor(min(jobs, len(items)), mp_context=get_context("spawn")) as pool:
        return list(pool.map(function, items))


def distil_specialists(
    seeds: Sequence[int] = (1, 2, 3),
    workdir: str | Path = "runs/benchmark_specialists/synthetic_capacity",
    student_config: str | Path = DISTILL_CONFIG,
    setting: dict[str, Any] | None = None,
    candidates: dict[str, list[str]] | None = None,
    jobs: int = 1,
    overrides: Sequence[str] = (),
) -> SpecialistDistillation:
    """Distil generalist + specialists into one student of the generalist's size; report the share kept.

    Args:
        seeds: one generalist, set of specialists and student per seed; the first one runs the candidates.
        workdir: the capacity study's directory (``seed<seed>/`` each): its finished runs are reused.
        student_config: ``kd`` config of the student (a ``DistillationModule`` whose teacher is a
            ``SpecialistTeacher``; the teacher's paths are set here).
        setting: the specialists' setting; default the shipped one (``capacity_study.DEFAULT_SETTING``).
        candidates: candidate name -> ``kd`` arguments of the distillation, chosen on ``val/acc`` with the
            first seed; default :data:`DEFAULT_CANDIDATES`; ``{}``: the config's own setting.
        jobs: processes running seeds side by side (one per core); 1: one after another, in this process.
        overrides: ``kd`` arguments for every run (generalists, specialists, students).

    Returns:
        The choice and one :class:`SeedDistillation` per seed.

    Raises:
        ValueError: no seed, or ``jobs`` below 1.
    """
    if not seeds:
        raise ValueError("`seeds` is empty: give at least one seed.")
    if not (isinstance(jobs, int) and jobs >= 1):
        raise ValueError(f"`jobs` must be a positive integer, got {jobs!r}.")
    workdir = Path(workdir).resolve()
    setting = dict(DEFAULT_SETTING if setting is None else setting)
    candidates = DEFAULT_CANDIDATES if candidates is None else candidates
    config = Path(student_config).resolve()
    teachers = _map(
        partial(_teacher, workdir=workdir, setting=setting, overrides=list(overrides)), list(seeds), jobs
    )
    arguments = {seed: [*t["teacher"], *overrides] for seed, t in zip(seeds, teachers, strict=True)}
    first = seeds[0]
    chosen, chosen_arguments, scores = "config", [], {}
    done: dict[int, StageResult] = {}
    if candidates:
        selection = choose_on_validation(
            "distillation setting",
            config,
            candidates,
            "distilled_selection",
            workdir / f"seed{first}",
            overrides=[f"--seed_everything={first}", *QUIET, *arguments[first]],
        )
        chosen, scores = selection.chosen, selection.scores
        chosen_arguments = list(candidates[chosen])
        done[first] = selection.result
    rest = [s for s in seeds if s not in done]
    students = _map(
        partial(_run_student, workdir=workdir, config=config, arguments=arguments, chosen=chosen_arguments),
        rest,
        jobs,
    )
    done.update(zip(rest, students, strict=True))
    results = [
        SeedDistillation(
            seed=seed,
            generalist=t["generalist"],
            combination=t["combination"],
            student=done[seed].test_acc,
            agreement=done[seed].metrics.get("test/agreement", math.nan),
            student_checkpoint=done[seed].checkpoint,
            teacher_arguments=t["teacher"],
        )
        for seed, t in zip(seeds, teachers, strict=True)
    ]
    return SpecialistDistillation(setting, chosen, chosen_arguments, scores, results)


def _run_student(
    seed: int, workdir: Path, config: Path, arguments: dict[int, list[str]], chosen: list[str]
) -> StageResult:
    return _student(seed, workdir, config, [*arguments[seed], *chosen])


def format_distillation(result: SpecialistDistillation) -> str:
    """:func:`distil_specialists`'s result as markdown: per seed and mean ± std, then the share kept."""
    from kd_lightning.summary import mean_std

    s = result.setting
    lines = [
        f"specialists: overlap {s['overlap']} (threshold {s['overlap_threshold']}), {s['epochs']} epochs, "
        f"soft weight {s['soft_weight']}; distillation setting: {result.chosen}"
        + (
            " (validation acc, first seed: "
            + ", ".join(f"{name} {100 * v:.2f}%" for name, v in result.scores.items())
            + ")"
            if result.scores
            else ""
        ),
        "",
        "| seed | generalist = student alone (%) | generalist + specialists, KL (%) | gain (points) "
        "| distilled student (%) | student gain (points) | share kept (%) | student-combination agreement (%) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result.seeds:
        lines.append(
            f"| {r.seed} | {100 * r.generalist:.2f} | {100 * r.combination:.2f} | {100 * r.gain:+.2f} "
            f"| {100 * r.student:.2f} | {100 * (r.student - r.generalist):+.2f} | {100 * r.kept:.1f} "
            f"| {100 * r.agreement:.2f} |"
        )
    rows = result.seeds
    finite = [r.kept for r in rows if math.isfinite(r.kept)]  # NaN where a seed's combination gains nothing
    kept = mean_std(finite, digits=1) if finite else "-"
    lines.append(
        f"| mean ± std | {mean_std([r.generalist for r in rows])} | {mean_std([r.combination for r in rows])} "
        f"| {mean_std([r.gain for r in rows])} | {mean_std([r.student for r in rows])} "
        f"| {mean_std([r.student - r.generalist for r in rows])} | {kept} "
        f"| {mean_std([r.agreement for r in rows])} |"
    )
    lines += ["", f"share kept of the means over seeds: {100 * result.share_kept:.1f}%"]
    return "\n".join(lines)
