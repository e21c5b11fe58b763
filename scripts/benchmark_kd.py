"""Benchmark: one Fashion-MNIST teacher, 3 student seeds trained alone and distilled, same recipe and budget.

    python scripts/benchmark_kd.py          # or: make benchmark

The teacher is the main job's (configs/fashion_mnist/teacher.yaml, reused from runs/ if finished).
The students are configs/fashion_mnist/student.yaml and distill_cached.yaml (distill.yaml's model
with the teacher's logits read from a store built once) with --seed_everything=1,2,3: the same
800-800 MLP, optimizer, schedule and epochs; only the loss differs. Two regimes
(:data:`kd_lightning.workflows.regimes.REGIMES`, run by :func:`~kd_lightning.workflows.regimes.run_regime`):

* full: the 55,000 training images, 15 epochs;
* transfer10: a fixed 10% of them (5,500 images, ``train_fraction=0.1``), 30 epochs: Hinton et al.'s
  section 6, soft targets as a regulariser when labelled data is scarce.

Prints (does not assert) per-seed test accuracies, mean +- sample std, and the gain.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kd_lightning.summary import mean_std
from kd_lightning.workflows.regimes import REGIMES, run_regime
from kd_lightning.workflows.stage import StageResult, run_stage

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "fashion_mnist"


def report(regime: str, seeds: list[int], alone: list[StageResult], distilled: list[StageResult]) -> None:
    a = [r.test_acc for r in alone]
    d = [r.test_acc for r in distilled]
    gains = [y - x for x, y in zip(a, d, strict=True)]
    setting = " ".join(REGIMES[regime]) or "the full training split, 15 epochs"
    print(f"\nregime {regime!r} ({setting}): 800-800 MLP ({alone[0].params:,} params), test accuracy (%)\n")
    print("| seed | alone | distilled | gain | agreement with teacher | fit s alone / distilled |")
    print("|---:|---:|---:|---:|---:|---:|")
    for seed, x, y in zip(seeds, alone, distilled, strict=True):
        print(
            f"| {seed} | {100 * x.test_acc:.2f} | {100 * y.test_acc:.2f} | {100 * (y.test_acc - x.test_acc):+.2f} "
            f"| {100 * y.metrics['test/agreement']:.2f} | {x.fit_seconds:.0f} / {y.fit_seconds:.0f} |"
        )
    print(f"| mean ± std | {mean_std(a)} | {mean_std(d)} | {mean_std(gains)} | | |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--workdir", default=str(ROOT))
    parser.add_argument("--force", action="store_true", help="recompute finished runs")
    parser.add_argument("overrides", nargs="*", help="kd arguments for every student run, after --")
    args = parser.parse_args()

    start = time.perf_counter()
    workdir = Path(args.workdir)
    # The teacher stage takes no overrides, so that the main job's finished teacher is reused.
    teacher = run_stage("teacher", CONFIGS / "teacher.yaml", workdir, force=args.force)
    print(
        f"\nteacher (SmallCNN, {teacher.params:,} params): {100 * teacher.test_acc:.2f}% test accuracy",
        flush=True,
    )
    results = {}
    for regime in args.regimes:
        alone, distilled = run_regime(regime, args.seeds, teacher, workdir, args.overrides, args.force)
        results[regime] = {
            "alone": [r.record() for r in alone],
            "distilled": [r.record() for r in distilled],
        }
        report(regime, args.seeds, alone, distilled)
    print(
        f"\nteacher: {100 * teacher.test_acc:.2f}% test accuracy; wall time: {time.perf_counter() - start:.0f} s"
    )
    out = workdir / "runs" / "benchmark_kd" / "results.json"
    out.write_text(json.dumps({"teacher": teacher.record(), **results}, indent=2))


if __name__ == "__main__":
    main()
