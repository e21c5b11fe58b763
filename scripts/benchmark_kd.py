"""Benchmark: one Fashion-MNIST teacher, 3 student seeds trained alone and distilled, same recipe and budget.

    python scripts/benchmark_kd.py          # or: make benchmark

The teacher is the main job's (configs/fashion_mnist/teacher.yaml, reused from runs/ if finished).
The students are configs/fashion_mnist/student.yaml and distill.yaml with --seed_everything=1,2,3:
the same 800-800 MLP, optimizer, schedule, augmentation and epochs; only the loss differs.
Prints (does not assert) per-seed test accuracies, mean +- sample std, and the gain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd_lightning.pipeline import run_stage  # noqa: E402

CONFIGS = ROOT / "configs" / "fashion_mnist"


def mean_std(values: list[float]) -> str:
    pct = [100 * v for v in values]
    spread = statistics.stdev(pct) if len(pct) > 1 else 0.0
    return f"{statistics.mean(pct):.2f} ± {spread:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--workdir", default=str(ROOT))
    parser.add_argument("--force", action="store_true", help="recompute finished runs")
    parser.add_argument("overrides", nargs="*", help="kd arguments for every run, after --")
    args = parser.parse_args()

    start = time.perf_counter()
    workdir = Path(args.workdir)
    teacher = run_stage("teacher", CONFIGS / "teacher.yaml", workdir, args.overrides, args.force)
    alone, distilled = [], []
    for seed in args.seeds:
        seed_dir = workdir / "runs" / "benchmark_kd" / f"seed{seed}"
        common = [f"--seed_everything={seed}", *args.overrides]
        alone.append(run_stage(f"alone s{seed}", CONFIGS / "student.yaml", seed_dir, common, args.force))
        distilled.append(
            run_stage(
                f"distilled s{seed}",
                CONFIGS / "distill.yaml",
                seed_dir,
                [*common, f"--model.init_args.teacher_ckpt={teacher.checkpoint}"],
                args.force,
            )
        )

    a = [r.test_acc for r in alone]
    d = [r.test_acc for r in distilled]
    gains = [y - x for x, y in zip(a, d, strict=True)]
    print("\nFashion-MNIST, 800-800 MLP student, test accuracy (%), same recipe and budget\n")
    print("| seed | alone | distilled | gain | agreement with teacher |")
    print("|---:|---:|---:|---:|---:|")
    for seed, x, y in zip(args.seeds, alone, distilled, strict=True):
        print(
            f"| {seed} | {100 * x.test_acc:.2f} | {100 * y.test_acc:.2f} | {100 * (y.test_acc - x.test_acc):+.2f} | "
            f"{100 * y.metrics['test/agreement']:.2f} |"
        )
    print(f"| mean ± std | {mean_std(a)} | {mean_std(d)} | {mean_std(gains)} | |")
    print(
        f"\nteacher (SmallCNN, {teacher.params:,} params): {100 * teacher.test_acc:.2f}%; "
        f"student: {alone[0].params:,} params; distilled fit {statistics.mean(r.fit_seconds for r in distilled):.0f} s "
        f"vs alone {statistics.mean(r.fit_seconds for r in alone):.0f} s per run"
    )
    print(f"wall time: {time.perf_counter() - start:.0f} s")
    out = workdir / "runs" / "benchmark_kd" / "results.json"
    out.write_text(
        json.dumps(
            {
                "teacher": asdict(teacher),
                "alone": [asdict(r) for r in alone],
                "distilled": [asdict(r) for r in distilled],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
