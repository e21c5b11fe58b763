"""The main job: each method of kd-lightning in the conditions where its effect exists, at a reduced budget,
every row beside its own baseline with the gain and its spread over seeds; one table, the pictures.

    python scripts/main_job.py            # or: make demo (about 15 min on a 2-core CPU)
    python scripts/main_job.py --force    # recompute finished stages

Every run is a ``kd`` stage of a shipped config (printed before it runs), under ``runs/main_job/``, reused
when finished; settings are the shipped configs' (chosen on validation by ``make reproduce``), never by
test accuracy. The budgets are the demo's, smaller than the reproduction's: where an effect is absent at
this budget, the table says so.

1. distillation (the paper's MNIST mechanism, configs/mnist1d/): an MLP teacher that sees circular shifts,
   the unregularised MLP student alone, and the same student distilled from the teacher's cached logits;
2. distilling an ensemble whose members overfit and disagree (configs/fashion_mnist/cnn_*_small_data.yaml:
   unregularised SmallCNNs on 25% of Fashion-MNIST);
3. a capacity-limited generalist and specialists with overlapping groups (configs/synthetic/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from kd_lightning.datamodules import FashionMNIST, IndexedDataModule
from kd_lightning.summary import mean_std
from kd_lightning.workflows.capacity_study import DEMO_EPOCHS, DEMO_SEEDS, capacity_demo
from kd_lightning.workflows.ensemble_distillation import distil_ensemble
from kd_lightning.workflows.mechanism import QUIET, gap_closure

ROOT = Path(__file__).resolve().parents[1]
M1D = ROOT / "configs" / "mnist1d"
SEEDS = (1, 2)
EPOCHS = {"teacher": 60, "student": 60, "ensemble": 16}


@dataclass
class Row:
    """One method beside its baseline: per-seed test accuracies of both.

    ``paired``: the two lists are runs of the same seeds (gain per seed); otherwise independent samples
    (the ensemble's members and the students distilled from it), compared by their means with Welch's
    standard error, so that every member counts and the baseline's own spread too.
    """

    effect: str
    conditions: str
    baseline: str
    method: str
    baseline_acc: list[float]
    method_acc: list[float]
    paired: bool = True

    @property
    def gain(self) -> float:
        return statistics.fmean(self.method_acc) - statistics.fmean(self.baseline_acc)

    @property
    def standard_error(self) -> float:
        if self.paired:
            g = [m - b for b, m in zip(self.baseline_acc, self.method_acc, strict=True)]
            return statistics.stdev(g) / len(g) ** 0.5 if len(g) > 1 else 0.0
        return (
            statistics.variance(self.method_acc) / len(self.method_acc)
            + statistics.variance(self.baseline_acc) / len(self.baseline_acc)
        ) ** 0.5

    def verdict(self) -> str:
        """'shows' when the mean gain is positive and exceeds twice its standard error, else 'absent at this
        budget'."""
        return "shows" if self.gain > 0 and self.gain > 2 * self.standard_error else "absent at this budget"


def distillation(workdir: Path, force: bool) -> Row:
    print(
        f"\n=== 1. distillation: configs/mnist1d/mlp_{{teacher,student,distill}}.yaml, teacher {EPOCHS['teacher']} "
        f"epochs, students {EPOCHS['student']} epochs, seeds {list(SEEDS)}",
        flush=True,
    )
    gap = gap_closure(
        M1D,
        "runs/mnist1d",
        workdir,
        seeds=SEEDS,
        teacher_candidates=None,
        temperatures=(),  # the config's
        teacher_epochs=EPOCHS["teacher"],
        student_epochs=EPOCHS["student"],
        check_budget=False,
        overrides=QUIET,
        force=force,
    )
    print(f"teacher: {100 * gap.teacher.result.test_acc:.2f}%", flush=True)
    return Row(
        "distillation (Hinton et al. §3)",
        f"MNIST-1D; teacher MLP 512-512 with shifts + dropout ({100 * gap.teacher.result.test_acc:.1f}%)",
        "MLP 256-256 alone",
        "distilled, cached soft targets",
        [r.test_acc for r in gap.alone],
        [r.test_acc for r in gap.distilled],
    )


def ensembles(workdir: Path) -> Row:
    fm = ROOT / "configs" / "fashion_mnist"
    print(
        "\n=== 2. ensemble distillation: configs/fashion_mnist/cnn_{member,distill_ensemble}_small_data.yaml, "
        f"3 members, students seeds {list(SEEDS)}, {EPOCHS['ensemble']} epochs on 25% of the training split",
        flush=True,
    )
    result = distil_ensemble(
        fm / "cnn_member_small_data.yaml",
        fm / "cnn_distill_ensemble_small_data.yaml",
        IndexedDataModule(
            FashionMNIST(), batch_size=1000, eval_batch_size=1000, val_size=5000, train_fraction=0.25
        ),
        member_seeds=(0, 1, 2),
        student_seeds=SEEDS,
        epochs=[EPOCHS["ensemble"]],
        out="runs/ensemble",
        workdir=workdir,
        overrides=list(QUIET),
    )
    b = result.budgets[0]
    print(
        f"ensemble: {100 * b.ensemble['acc']:.2f}% (members disagree on {100 * b.disagreement:.1f}%)",
        flush=True,
    )
    return Row(
        "ensemble distillation (Hinton et al. §4)",
        f"Fashion-MNIST (25%), 3 unregularised SmallCNN members (seeds), ensemble {100 * b.ensemble['acc']:.1f}%",
        "student alone = a member",
        "distilled from the ensemble",
        b.members,
        b.distilled,
        paired=False,
    )


def specialists(workdir: Path) -> Row:
    print(
        f"\n=== 3. specialists: configs/synthetic/{{generalist,specialist}}.yaml, specialists {DEMO_EPOCHS} epochs, "
        f"seeds {list(DEMO_SEEDS)} (kd_lightning.workflows.capacity_study.capacity_demo)",
        flush=True,
    )
    study = capacity_demo(workdir / "runs" / "specialists")
    reports = [r["report"] for r in study["runs"]]
    groups = len(reports[0]["groups"])
    return Row(
        "generalist + specialists (Hinton et al. §5)",
        f"100 confusable classes; generalist MLP with 16 hidden units (capacity-limited); {groups} overlapping groups",
        "generalist alone",
        f"+ {groups} specialists, KL combination",
        [r["acc"]["generalist"] for r in reports],
        [r["acc"]["kl"] for r in reports],
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "main_job"), help="where the runs go")
    parser.add_argument("--force", action="store_true", help="recompute stages that already finished")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = [distillation(workdir, args.force), ensembles(workdir), specialists(workdir)]
    wall = time.perf_counter() - start

    print(
        f"\nTest accuracy (%), mean ± std over seeds (students {list(SEEDS)}; the ensemble's 3 members); gain in "
        "points ± its standard error (per seed where the seeds pair up, Welch's for the ensemble's members and "
        "students)\n"
    )
    print("| effect | conditions | baseline | acc (%) | with the method | acc (%) | gain | verdict |")
    print("|---|---|---|---:|---|---:|---:|---|")
    for r in rows:
        print(
            f"| {r.effect} | {r.conditions} | {r.baseline} | {mean_std(r.baseline_acc)} | {r.method} | "
            f"{mean_std(r.method_acc)} | {100 * r.gain:+.2f} ± {100 * r.standard_error:.2f} | {r.verdict()} |"
        )
    pictures = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*.png") if "wandb" not in p.parts)
    print("pictures:\n  " + "\n  ".join(pictures))
    print(f"wall time: {wall:.0f} s")
    record = [
        {**r.__dict__, "gain": r.gain, "standard_error": r.standard_error, "verdict": r.verdict()}
        for r in rows
    ]
    (workdir / "main_job.json").write_text(
        json.dumps({"rows": record, "wall_seconds": round(wall, 1)}, indent=2)
    )


if __name__ == "__main__":
    main()
