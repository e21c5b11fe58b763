"""The paper's omitted-class experiment (Hinton et al. 2015, section 3) as ``kd`` stages.

A student is distilled on a transfer set that holds no example of one class (``omit_classes``); it has
only seen that class in the teacher's soft targets for the other classes. Raising that class's bias
recovers most of it: the paper raised the bias of 3 by 3.5 and recognised 98.6% of the test 3s, a
shift it tuned on the test set. Here the shift is chosen on the validation split only, and the test
split is scored once, before and after.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from kd_lightning.ensemble import predict_logits
from kd_lightning.modules import load_teacher
from kd_lightning.workflows.mechanism import QUIET, TEMPERATURE, run_args, store_args
from kd_lightning.workflows.stage import StageResult, own_argv, run_stage, working_directory

BIAS_GRID = tuple(x / 2 for x in range(0, 31))
"""Candidate shifts of the omitted class's logit: 0, 0.5, ..., 15."""


def choose_bias(
    val_logits: Tensor, val_targets: Tensor, cls: int, grid: Sequence[float]
) -> tuple[float, list[float]]:
    """The shift of class ``cls``'s logit that maximises accuracy on the given (validation) data.

    Ties go to the smallest shift in absolute value.

    Args:
        val_logits: ``(N, C)`` logits of validation samples (never the test set).
        val_targets: their labels.
        cls: the class whose bias is shifted.
        grid: candidate shifts.

    Returns:
        (best shift, validation accuracy at every shift of ``grid``).

    Raises:
        ValueError: ``cls`` is not a class id of ``val_logits``, or ``grid`` is empty.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.0], [2.0, 1.5], [0.0, 2.0]])
        >>> choose_bias(logits, torch.tensor([0, 1, 1]), 1, [0.0, 1.0, 3.0])
        (1.0, [0.6666666865348816, 1.0, 0.6666666865348816])
    """
    if not 0 <= cls < val_logits.shape[1]:
        raise ValueError(f"`cls` must be a class id in [0, {val_logits.shape[1]}), got {cls}.")
    if not grid:
        raise ValueError("`grid` is empty: give at least one candidate shift.")
    accs = []
    for b in grid:
        shifted = val_logits.clone()
        shifted[:, cls] += b
        accs.append(float((shifted.argmax(-1) == val_targets).float().mean()))
    best = max(range(len(grid)), key=lambda i: (accs[i], -abs(grid[i])))
    return float(grid[best]), accs


@dataclass
class Score:
    """Test errors with a given shift: all errors, errors on the omitted class, and its accuracy."""

    shift: float
    errors: int
    errors_on_class: int
    class_accuracy: float


def score(logits: Tensor, targets: Tensor, cls: int, shift: float) -> Score:
    """:class:`Score` of ``logits`` after adding ``shift`` to class ``cls``'s logit.

    Example:
        >>> import torch
        >>> score(torch.tensor([[2.0, 0.0], [2.0, 1.5]]), torch.tensor([0, 1]), 1, 1.0)
        Score(shift=1.0, errors=0, errors_on_class=0, class_accuracy=1.0)
    """
    shifted = logits.clone()
    shifted[:, cls] += shift
    wrong = shifted.argmax(-1) != targets
    of_cls = targets == cls
    return Score(shift, int(wrong.sum()), int((wrong & of_cls).sum()), float((~wrong[of_cls]).float().mean()))


def split_logits(
    result: StageResult, config: str | Path, args: Sequence[str], workdir: str | Path
) -> dict[str, tuple[Tensor, Tensor]]:
    """The fitted model's logits and targets on the validation and test splits of the stage's data
    (built by ``kd`` from ``config`` and ``args``, as the stage built it)."""
    from kd_lightning.cli import main  # builds the data exactly as the stage's `kd fit` did

    model = load_teacher(result.checkpoint)
    with working_directory(Path(workdir)), own_argv():
        data = main(["--config", str(config), *args], run=False).datamodule
        data.setup("fit")
        data.setup("test")
        return {
            "val": predict_logits(model, data.val_dataloader()),
            "test": predict_logits(model, data.test_dataloader()),
        }


def omitted_class(
    distill_config: str | Path,
    teacher_checkpoint: str | Path,
    out: str | Path,
    workdir: str | Path = ".",
    cls: int = 3,
    temperature: float = 20.0,
    epochs: int = 100,
    seeds: Sequence[int] = (1,),
    grid: Sequence[float] = BIAS_GRID,
    overrides: Sequence[str] = QUIET,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Distil on a transfer set without class ``cls``, then shift its bias, chosen on validation.

    Args:
        distill_config: the distillation config (its SoftTargetCache the last callback).
        teacher_checkpoint: the teacher (trained on every class).
        out: directory of the runs and of the transfer set's store (relative to ``workdir``).
        workdir: where the config's relative paths resolve.
        cls: the class left out of the transfer set.
        temperature: the distillation temperature.
        epochs: the student's budget.
        seeds: one student per seed.
        grid: candidate bias shifts.
        overrides: ``kd`` arguments for every run.
        force: refit finished stages.

    Returns:
        One row per seed: the test :class:`Score` before and after the chosen shift (as dicts), the
        shift, the validation accuracy at each shift, and the number of test examples of ``cls``.
    """
    root = (Path(workdir) / out).resolve()
    rows = []
    for seed in seeds:
        args = run_args(
            seed,
            epochs,
            root / f"omit{cls}",
            [
                *store_args(root / "soft_targets", teacher_checkpoint),
                f"--data.init_args.omit_classes=[{cls}]",
                f"{TEMPERATURE}={temperature}",
                *overrides,
            ],
        )
        result = run_stage(f"omitted {cls} s{seed}", distill_config, workdir, args, force)
        logits = split_logits(result, distill_config, args, workdir)
        bias, val_accs = choose_bias(*logits["val"], cls, grid)
        test_logits, test_targets = logits["test"]
        rows.append(
            {
                "seed": seed,
                "cls": cls,
                "before": asdict(score(test_logits, test_targets, cls, 0.0)),
                "after": asdict(score(test_logits, test_targets, cls, bias)),
                "bias": bias,
                "grid": list(grid),
                "val_accs": val_accs,
                "n_cls": int((test_targets == cls).sum()),
                "n_test": len(test_targets),
            }
        )
    return rows
