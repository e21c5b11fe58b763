"""Benchmark: intermediate-layer distillation on Fashion-MNIST, CNN teacher -> smaller CNN student.

    OMP_NUM_THREADS=1 python scripts/benchmark_features.py          # or: make benchmark-features
    python scripts/benchmark_features.py --quick                    # every stage at a few batches (wiring only)

One teacher (configs/fashion_mnist/features_teacher.yaml, SmallCNN 16-32), then for each seed the student
(SmallCNN 8-16) alone, with Hinton KD, with FitNets hints and with attention transfer, with the same
network, recipe, data (25% of the training split) and budget. Each method's weight is chosen on the
validation split with the first seed (two candidates each); the gains over the student alone are paired
by seed. The work is :func:`kd_lightning.workflows.feature_study.compare_feature_methods` (also
``kd feature-kd``); finished stages under --out are reused.

Prints (does not assert) the teacher, a table of test accuracies per seed with mean ± sample std, the
paired gains and their verdicts, the validation choices, and what storing the teacher's features would cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from kd_lightning.summary import mean_std
from kd_lightning.workflows.feature_study import CANDIDATES, QUICK, FeatureStudy, compare_feature_methods

ROOT = Path(__file__).resolve().parents[1]


def report(study: FeatureStudy) -> None:
    teacher = study.teacher
    print(
        f"\nteacher SmallCNN 16-32 ({teacher['params']:,} params): {100 * teacher['test_acc']:.2f}% test accuracy, "
        f"fit {teacher['fit_seconds']:.0f} s"
    )
    seeds = " | ".join(f"seed {s}" for s in study.seeds)
    print(f"\nstudent SmallCNN 8-16 ({study.student_params:,} params), test accuracy (%)\n")
    print(
        f"| method | chosen on validation | {seeds} | mean ± std | gain vs alone (mean ± std) | verdict | fit s |"
    )
    print("|---|---|" + "---:|" * len(study.seeds) + "---:|---:|---|---:|")
    alone = " | ".join(f"{100 * a:.2f}" for a in study.alone)
    fit = sum(study.alone_seconds) / len(study.alone_seconds)
    print(f"| student alone | | {alone} | {mean_std(study.alone)} | | | {fit:.0f} |")
    for m in study.methods:
        accs = " | ".join(f"{100 * a:.2f}" for a in m.test_acc)
        fit = sum(m.fit_seconds) / len(m.fit_seconds)
        print(
            f"| {m.name} | {m.chosen} | {accs} | {mean_std(m.test_acc)} | {mean_std(m.gains)} | {m.verdict} | {fit:.0f} |"
        )
    print("\nvalidation accuracy of the candidates (first seed; the choice reads nothing else):")
    for m in study.methods:
        scores = ", ".join(f"{c} {100 * v:.2f}" for c, v in m.scores.items()) or "none (the config's setting)"
        print(f"  {m.name}: {scores}")
    print(
        "\nbytes per sample (fp16) a store would need for the teacher's compared features, against its logits:"
    )
    for method, size in study.feature_bytes.items():
        print(
            f"  {method}: features {size['features']:,} ({size['features'] / size['logits']:.0f}x the logits' "
            f"{size['logits']}), attention maps only {size['attention_maps']:,}"
        )
    print(f"\nwall time: {study.seconds:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", default="runs/benchmark_features", help="directory of every run (reused)")
    parser.add_argument("--workdir", default=str(ROOT))
    parser.add_argument(
        "--quick", action="store_true", help="every stage at a few batches: checks the wiring"
    )
    parser.add_argument(
        "--no-choice", action="store_true", help=f"keep the configs' settings, not {list(CANDIDATES)}"
    )
    parser.add_argument("--force", action="store_true", help="recompute finished runs")
    parser.add_argument("overrides", nargs="*", help="kd arguments for every run, after --")
    args = parser.parse_args()
    overrides = [*(QUICK if args.quick else []), *args.overrides]
    study = compare_feature_methods(
        args.seeds, args.out, args.workdir, choose=not args.no_choice, overrides=overrides, force=args.force
    )
    report(study)
    out = Path(args.workdir) / args.out / "results.json"
    out.write_text(json.dumps(dataclasses.asdict(study), indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
