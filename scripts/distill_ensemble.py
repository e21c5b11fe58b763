"""Distil an ensemble of independently initialised CNNs into one CNN of a member's size, at two budgets.

    python scripts/distill_ensemble.py                     # CNNs: 3 members, 3 students, 8 and 20 epochs
    python scripts/distill_ensemble.py --epochs 2 --quick  # 50 batches per epoch: checks the plumbing
    python scripts/distill_ensemble.py --family mlp --members 0 1 2 3 --epochs 10   # the MLP 512-512 members

Members: configs/fashion_mnist/cnn_member.yaml (SmallCNN [8, 16], head 64; seeds 0-2). Students:
configs/fashion_mnist/cnn_distill_ensemble.yaml (the members' network and recipe, on the ensemble's soft
targets from the soft-target store). The members are also the students alone. The temperature and hard-label
weight are chosen on the validation split with the first student seed at the first budget. The workflow is
:func:`kd_lightning.workflows.ensemble_distillation.distil_ensemble`; docs/ensembles.md reports its output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from kd_lightning.datamodules import FashionMNIST, IndexedDataModule
from kd_lightning.summary import mean_std
from kd_lightning.workflows.ensemble_distillation import distil_ensemble, distillation_candidates

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "fashion_mnist"
# family -> (member config, student config, directory of the runs)
FAMILIES = {
    "cnn": ("cnn_member.yaml", "cnn_distill_ensemble.yaml", "runs/fashion_mnist/ensemble_distillation"),
    "mlp": ("member.yaml", "distill_ensemble.yaml", "runs/fashion_mnist/ensemble_distillation_mlp"),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=sorted(FAMILIES), default="cnn", help="the members' configs")
    parser.add_argument("--workdir", default=str(ROOT), help="where runs/ is written (default: the repo)")
    parser.add_argument("--members", type=int, nargs="+", default=[0, 1, 2], help="member seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102], help="student seeds")
    parser.add_argument("--epochs", type=int, nargs="+", default=[8, 20], help="budgets")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--hard-weights", type=float, nargs="+", default=[0.5])
    parser.add_argument("--quick", action="store_true", help="50 batches per epoch (plumbing check)")
    parser.add_argument("overrides", nargs="*", help="kd arguments for every run, after --")
    args = parser.parse_args()
    overrides = ["--trainer.enable_progress_bar=false", *args.overrides]
    member_config, student_config, out = FAMILIES[args.family]
    if args.quick:
        overrides.append("--trainer.limit_train_batches=50")
        out += "_quick"
    start = time.perf_counter()
    result = distil_ensemble(
        CONFIGS / member_config,
        CONFIGS / student_config,
        IndexedDataModule(FashionMNIST(), batch_size=1000, eval_batch_size=1000, val_size=5000),
        member_seeds=args.members,
        student_seeds=args.seeds,
        epochs=args.epochs,
        candidates=distillation_candidates(args.temperatures, args.hard_weights),
        out=out,
        workdir=args.workdir,
        overrides=overrides,
    )
    wall = time.perf_counter() - start

    print(f"\nchoice on validation (student seed {result.selection_seed}, {result.selection_epochs} epochs):")
    for name, score in result.scores.items():
        print(f"  {name}: val/acc {100 * score:.2f}%{'  <- chosen' if name == result.chosen else ''}")
    b0 = result.budgets[0]
    print(
        f"\nFashion-MNIST test accuracy (10,000 images), {member_config} ({b0.member_params:,} parameters); "
        f"{len(b0.members)} members, {len(b0.distilled)} students, mean ± std (population) over seeds\n"
    )
    print(
        "| epochs | members = students alone | ensemble | members disagree | distilled student | "
        "ensemble gain | distilled gain | share kept | student-ensemble agreement |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in result.budgets:
        print(
            f"| {b.epochs} | {mean_std(b.members, sample=False)} | {100 * b.ensemble['acc']:.2f} | "
            f"{100 * b.disagreement:.2f}% | {mean_std(b.distilled, sample=False)} | {100 * b.ensemble_gain:+.2f} | "
            f"{100 * b.distilled_gain:+.2f} | {100 * b.share_kept:.0f}% | {mean_std(b.agreement, sample=False)}% |"
        )
    print("\nper seed (test acc %):")
    for b in result.budgets:
        members = " / ".join(f"{100 * a:.2f}" for a in b.members)
        students = " / ".join(f"{100 * a:.2f}" for a in b.distilled)
        print(f"  {b.epochs} epochs: members {members}; distilled {students}")
    print(f"wall time: {wall:.0f} s")
    report = Path(args.workdir) / out / "report.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({**dataclasses.asdict(result), "wall_seconds": round(wall, 1)}, indent=2))
    print(f"report: {report}")


if __name__ == "__main__":
    main()
