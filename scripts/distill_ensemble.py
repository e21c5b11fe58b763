"""Distil an ensemble into one student of a member's size, and report the share of the ensemble's gain kept.

    python scripts/distill_ensemble.py            # or: make distill-ensemble
    python scripts/distill_ensemble.py --quick    # 1 epoch: checks the plumbing in a minute

Hinton et al. (2015, section 4) distilled 10 models that differed only in their initialisation into one
model of the same size and kept over 80% of the ensemble's gain. Here: 4 members of
configs/fashion_mnist/member.yaml (MLP 512-512, 10 epochs, seeds 0-3; trained by
:func:`kd_lightning.workflows.members.train_members`, reused from scripts/study_ensembles.py when it ran with the
same overrides), their mean-of-probabilities ensemble, and students with the members' architecture,
recipe and budget trained by configs/fashion_mnist/distill_ensemble.yaml on the ensemble's soft targets
(filled once into a soft-target store). The members are the students' baseline: same network, same
training, hard labels only. Share kept = (student - member mean) / (ensemble - member mean).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from kd_lightning.datamodules import FashionMNIST, IndexedDataModule
from kd_lightning.ensemble import Ensemble, classification_metrics, predict_logits
from kd_lightning.summary import mean_std
from kd_lightning.workflows.members import seed_overrides, train_members
from kd_lightning.workflows.stage import run_stage

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "fashion_mnist"
MEMBERS_OUT = "runs/fashion_mnist/members/member"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default=str(ROOT), help="where runs/ is written (default: the repo)")
    parser.add_argument("--members", type=int, default=4, help="ensemble size")
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102], help="student seeds")
    parser.add_argument("--quick", action="store_true", help="1 epoch, 50 batches (plumbing check)")
    parser.add_argument("overrides", nargs="*", help="kd arguments for every run, after --")
    args = parser.parse_args()
    overrides = list(args.overrides)
    if args.quick:
        overrides += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=50"]
    start = time.perf_counter()

    members = train_members(
        CONFIGS / "member.yaml", range(args.members), MEMBERS_OUT, args.workdir, overrides=overrides
    )
    checkpoints = [m.checkpoint for m in members]
    ensemble = Ensemble(checkpoints=checkpoints, rule="mean_probs")
    dm = IndexedDataModule(FashionMNIST(), batch_size=1000, eval_batch_size=1000, val_size=5000)
    dm.setup("test")
    ens_metrics = classification_metrics(*predict_logits(ensemble, dm.test_dataloader()))

    teacher_arg = "--model.init_args.teacher.init_args.checkpoints=[" + ",".join(checkpoints) + "]"
    # The store is keyed by the teacher's fingerprint: a different ensemble rebuilds it, never reuses it.
    students = [
        run_stage(
            f"distilled student (seed {seed})",
            CONFIGS / "distill_ensemble.yaml",
            args.workdir,
            [*overrides, teacher_arg, *seed_overrides(seed, "runs/fashion_mnist/distill_ensemble")],
        )
        for seed in args.seeds
    ]
    wall = time.perf_counter() - start

    member_acc = [m.test_acc for m in members]
    student_acc = [s.test_acc for s in students]
    base, ens = statistics.fmean(member_acc), ens_metrics["acc"]
    share = (statistics.fmean(student_acc) - base) / (ens - base) if ens != base else float("nan")
    params = members[0].params
    print(f"\nFashion-MNIST test accuracy (10,000 images); MLP 512-512 ({params:,} parameters) everywhere\n")
    print("| model | runs | test acc (%) | parameters |")
    print("|---|---:|---:|---:|")
    print(f"| member (hard labels) | {len(members)} | {mean_std(member_acc, sample=False)} | {params:,} |")
    print(f"| ensemble (mean of probabilities) | 1 | {100 * ens:.2f} | {len(members) * params:,} |")
    print(
        f"| distilled student | {len(students)} | {mean_std(student_acc, sample=False)} | {students[0].params:,} |"
    )
    agreement = [s.metrics.get("test/agreement", float("nan")) for s in students]
    print(
        f"\nensemble gain over a member: {100 * (ens - base):+.2f} points; the student's: "
        f"{100 * (statistics.fmean(student_acc) - base):+.2f}; share of the ensemble's gain kept: {100 * share:.0f}% "
        f"(Hinton et al., speech, 10 members: over 80%)"
    )
    print(
        f"student-ensemble test agreement: {mean_std(agreement, sample=False)}%; ensemble NLL {ens_metrics['nll']:.4f}"
    )
    print(f"wall time: {wall:.0f} s")
    out = Path(args.workdir) / "runs" / "fashion_mnist" / "distill_ensemble" / "report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "members": member_acc,
                "ensemble": ens_metrics,
                "students": student_acc,
                "share_kept": share,
                "wall_seconds": round(wall, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
