"""Distil an ensemble of independently initialised members into one student of a member's size, at one or
more training budgets, and measure the share of the ensemble's gain the student keeps.

Hinton et al. (2015, section 4) distilled an ensemble of networks that differ only by their initialisation
into one network of the same size and kept most of the ensemble's gain; Kondratyuk et al. (2020) compare
such ensembles with single larger networks of equal cost. For each budget ``E`` (epochs) the workflow

1. trains the members (``member_config``, seeds ``member_seeds``, ``E`` epochs; finished members are reused,
   :func:`~kd_lightning.workflows.members.train_members`). The members are also the *students alone*: the
   student's network trained with the same recipe and budget on hard labels only;
2. evaluates the members and their ensemble (``rule``) on the test split of ``data``, and how often the
   members disagree (:func:`~kd_lightning.ensemble.disagreement`);
3. on the first budget only, chooses the distillation's hyper-parameters among ``candidates`` on the
   *validation* split with the first student seed (:func:`~kd_lightning.workflows.selection.choose_on_validation`);
   the choice holds for every budget;
4. trains the distilled students (``student_config``, seeds ``student_seeds``, ``E`` epochs) on the
   ensemble's soft targets (the config's soft-target store, filled once per ensemble). The first seed at
   the first budget is the chosen candidate's run itself.

Share kept = (distilled student mean - member mean) / (ensemble - member mean).

Layout under ``out``: ``e<E>/members/member_<k>/seed<k>``, ``e<E>/selection/<candidate>/seed<s>``,
``e<E>/distilled/seed<s>``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch

from kd_lightning.ensemble import RULES, classification_metrics, combine_logits, disagreement, predict_logits
from kd_lightning.modules import load_teacher
from kd_lightning.workflows.members import seed_overrides, train_members
from kd_lightning.workflows.selection import choose_on_validation
from kd_lightning.workflows.stage import StageResult, run_stage

TEACHER = "--model.init_args.teacher.init_args"
OBJECTIVE = "--model.init_args.objective.init_args"


def share_kept(student: float, member: float, ensemble: float) -> float:
    """The share of the ensemble's gain over a member that the student keeps; NaN when there is no gain.

    Example:
        >>> round(share_kept(0.925, 0.92, 0.93), 6), share_kept(0.9, 0.9, 0.9)
        (0.5, nan)
    """
    gain = ensemble - member
    return (student - member) / gain if gain != 0 else math.nan


def distillation_candidates(
    temperatures: Sequence[float], hard_weights: Sequence[float]
) -> dict[str, list[str]]:
    """Candidate settings of a ``HintonKD`` objective for :func:`choose_on_validation`: every pair.

    Example:
        >>> distillation_candidates([4.0], [0.5])
        {'T4_h0.5': ['--model.init_args.objective.init_args.temperature=4.0', \
'--model.init_args.objective.init_args.hard_weight=0.5']}
    """
    return {
        f"T{t:g}_h{h:g}": [f"{OBJECTIVE}.temperature={float(t)}", f"{OBJECTIVE}.hard_weight={float(h)}"]
        for t in temperatures
        for h in hard_weights
    }


@dataclass
class BudgetResult:
    """The members, their ensemble and the distilled students at one budget (test accuracies in [0, 1]).

    Args:
        epochs: the budget of every run (members and students).
        members: each member's test accuracy; the members are also the students alone (same network,
            recipe and budget, hard labels).
        member_checkpoints: the members' checkpoints.
        ensemble: the ensemble's test ``acc``, ``nll`` and ``ece``.
        disagreement: share of test images on which the members' top-1 predictions are not all equal.
        distilled: each distilled student's test accuracy, in the order of the student seeds.
        agreement: each distilled student's top-1 agreement with the ensemble on the test split.
        member_params: parameters of one member.
        student_params: parameters of the student.
        ensemble_gain: ensemble - member mean.
        distilled_gain: distilled student mean - member mean.
        share_kept: ``distilled_gain / ensemble_gain``.
    """

    epochs: int
    members: list[float]
    member_checkpoints: list[str]
    ensemble: dict[str, float]
    disagreement: float
    distilled: list[float]
    agreement: list[float]
    member_params: int
    student_params: int
    ensemble_gain: float = field(init=False)
    distilled_gain: float = field(init=False)
    share_kept: float = field(init=False)

    def __post_init__(self) -> None:
        base = statistics.fmean(self.members)
        self.ensemble_gain = self.ensemble["acc"] - base
        self.distilled_gain = statistics.fmean(self.distilled) - base
        self.share_kept = share_kept(statistics.fmean(self.distilled), base, self.ensemble["acc"])


@dataclass
class EnsembleDistillation:
    """The outcome of :func:`distil_ensemble`.

    Args:
        chosen: the chosen candidate's name (``"config"`` when there was no choice).
        chosen_arguments: its ``kd`` arguments, given to every distilled student.
        scores: candidate -> validation accuracy of its run (first seed, first budget).
        selection_epochs: the budget the choice was made at.
        selection_seed: the student seed the candidates ran with.
        budgets: one :class:`BudgetResult` per budget, in the order given.
    """

    chosen: str
    chosen_arguments: list[str]
    scores: dict[str, float]
    selection_epochs: int
    selection_seed: int
    budgets: list[BudgetResult]


def _test_logits(
    checkpoints: Sequence[str], data: L.LightningDataModule
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, N, C)`` test logits of the members and the ``N`` targets."""
    outputs = [predict_logits(load_teacher(c), data.test_dataloader()) for c in checkpoints]
    return torch.stack([o[0] for o in outputs]), outputs[0][1]


def distil_ensemble(
    member_config: str | Path,
    student_config: str | Path,
    data: L.LightningDataModule,
    member_seeds: Sequence[int] = (0, 1, 2),
    student_seeds: Sequence[int] = (100, 101, 102),
    epochs: Sequence[int] = (8, 24),
    candidates: dict[str, list[str]] | None = None,
    out: str | Path = "runs/ensemble_distillation",
    workdir: str | Path = ".",
    rule: str = "mean_probs",
    overrides: Sequence[str] = (),
) -> EnsembleDistillation:
    """Train members, ensemble them, choose the distillation's setting on validation, distil students.

    Args:
        member_config: ``kd`` config of one member (a classifier); also the students-alone baseline.
        student_config: ``kd`` config of the distilled student (a ``DistillationModule`` whose teacher is an
            ``Ensemble``; its checkpoints and rule are set here).
        data: the DataModule whose test split evaluates the members and the ensemble (the configs' data).
        member_seeds: one member per seed (member ``k`` is seeded ``k``); at least two.
        student_seeds: one distilled student per seed; the first one runs the candidates.
        epochs: the budgets (``--trainer.max_epochs``) of members and students, e.g. ``[8, 20]``.
        candidates: candidate name -> ``kd`` arguments of the distillation (e.g.
            :func:`distillation_candidates`), chosen on ``val/acc``; ``None``: the config's own setting.
        out: directory of every run (relative to ``workdir``).
        workdir: where the configs' relative paths resolve.
        rule: the ensemble's combination rule (``mean_probs``, ``mean_logits``, ``geometric``).
        overrides: ``kd`` arguments for every run.

    Returns:
        The choice and one :class:`BudgetResult` per budget.

    Raises:
        ValueError: fewer than two member seeds, a negative member seed, no student seed, no budget, a
            budget below 1, or an unknown rule.
    """
    if len(member_seeds) < 2 or min(member_seeds) < 0:
        raise ValueError(f"`member_seeds` must be two or more non-negative seeds, got {list(member_seeds)}.")
    if not student_seeds:
        raise ValueError("`student_seeds` is empty: give at least one seed.")
    if not epochs or min(epochs) < 1:
        raise ValueError(f"`epochs` must be one or more budgets >= 1, got {list(epochs)}.")
    if rule not in RULES:
        raise ValueError(f"`rule` must be one of {sorted(RULES)}, got {rule!r}.")
    data.prepare_data()
    data.setup("test")
    out = Path(out)
    choice: tuple[str, list[str], dict[str, float]] | None = None
    budgets: list[BudgetResult] = []
    for budget in epochs:
        run_args = [*overrides, f"--trainer.max_epochs={budget}"]
        members = train_members(
            member_config, list(member_seeds), out / f"e{budget}" / "members", workdir, overrides=run_args
        )
        checkpoints = [m.checkpoint for m in members]
        logits, target = _test_logits(checkpoints, data)
        teacher = [f"{TEACHER}.checkpoints=[{','.join(checkpoints)}]", f"{TEACHER}.rule={rule}"]
        student_args = [*run_args, *teacher]

        first: StageResult | None = None
        if choice is None:
            if candidates:
                selection = choose_on_validation(
                    "distillation setting",
                    student_config,
                    candidates,
                    out / f"e{budget}" / "selection",
                    workdir,
                    overrides=[*student_args, f"--seed_everything={student_seeds[0]}"],
                )
                choice = (selection.chosen, list(candidates[selection.chosen]), selection.scores)
                first = selection.result
            else:
                choice = ("config", [], {})
        students = [
            first
            if i == 0 and first is not None
            else run_stage(
                f"distilled student (seed {seed}, {budget} epochs)",
                student_config,
                workdir,
                [*student_args, *choice[1], *seed_overrides(seed, out / f"e{budget}" / "distilled")],
            )
            for i, seed in enumerate(student_seeds)
        ]
        budgets.append(
            BudgetResult(
                epochs=budget,
                members=[m.test_acc for m in members],
                member_checkpoints=checkpoints,
                ensemble=classification_metrics(combine_logits(logits, rule), target),
                disagreement=disagreement(logits),
                distilled=[s.test_acc for s in students],
                agreement=[s.metrics.get("test/agreement", math.nan) for s in students],
                member_params=members[0].params,
                student_params=students[0].params,
            )
        )
    assert choice is not None
    return EnsembleDistillation(
        chosen=choice[0],
        chosen_arguments=choice[1],
        scores=choice[2],
        selection_epochs=epochs[0],
        selection_seed=student_seeds[0],
        budgets=budgets,
    )
