"""Benchmark: generalist + specialists (Hinton et al. 2015, section 5) on planted groups and on Fashion-MNIST.

    python scripts/benchmark_specialists.py           # full: about 10 min on 2 cores with the main job's teacher
    python scripts/benchmark_specialists.py --quick   # smoke run of every step, about 2 min
    python scripts/benchmark_specialists.py --ari-only  # step 0 alone: no training, under a minute
    python scripts/benchmark_specialists.py --capacity-only --select  # step 3 alone, settings chosen first
    python scripts/benchmark_specialists.py --demo      # step 3 at a small budget: 2 seeds, a few minutes

0. Grouping methods on planted hierarchies (``kd_lightning.planted.planted_hierarchy``: uneven group
   sizes, a simulated generalist's predictions, no training): the adjusted Rand index of each
   grouping method of ``kd_lightning.clustering`` against the planted groups, per setting and seed.

1. Synthetic data with planted groups (``kd_lightning.datamodules.Synthetic``: 50 Gaussian classes in 10
   superclasses; labels permuted so the groups are not contiguous blocks). Per seed and for two
   generalist widths (one hidden layer of 16 or 64 units): an MLP generalist with the
   ConfusionClustering callback, the adjusted Rand index of its groups against the planted ones, one
   specialist per group (same MLP), and the combination.
2. Fashion-MNIST. The generalist is the main job's teacher (runs/fashion_mnist/teacher; trained with
   configs/fashion_mnist/teacher.yaml if missing); its groups come from
   ``kd validate --config configs/fashion_mnist/generalist.yaml``; the specialists from
   ``scripts/train_specialists.py --config configs/fashion_mnist/specialist.yaml`` with seeds 1, 2, 3.
3. Where the paper's condition holds (``kd_lightning.workflows.capacity_study``; configs/synthetic/):
   a capacity-limited generalist (MLP, 16 hidden units) on 100 confusable classes in 10 superclasses
   that overlap at their borders, a 64-unit reference, overlapping groups (each class in up to 3 groups it
   is confused with), specialists and the KL combination; Table 4 with rows 1, 2, 3+ beside the paper's.
   ``--select`` first chooses overlap, specialist epochs and soft weight on seed 1's validation split.

The runs are :mod:`kd_lightning.workflows.specialist_study`'s and :mod:`kd_lightning.workflows.capacity_study`'s;
this script runs and prints them.
Prints (does not assert) the groups, test accuracy of the generalist alone, of the KL combination and
of averaging the most confident specialists, the conditional accuracy on the specialists' classes,
accuracy by how many specialists cover the true class (the paper's Table 4), and the inference cost
(specialists run per input, FLOPs and wall time relative to the generalist alone). ``--quick`` writes
under runs/benchmark_specialists_quick/ and never touches runs/fashion_mnist/.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from kd_lightning.workflows.capacity_study import (
    capacity_demo,
    capacity_study,
    choose_settings,
    format_capacity_report,
)
from kd_lightning.workflows.specialist_study import (
    QUICK,
    fashion_mnist_generalist,
    fashion_mnist_groups,
    fashion_mnist_run,
    format_ari_table,
    format_tables,
    grouping_ari,
    plot_pooled,
    synthetic_run,
)

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_WIDTHS = (16, 64)


def print_tables(title: str, seeds: list[int], reports: list[dict[str, Any]], picture: Path) -> None:
    """Print the tables and draw the pooled Table 4 at ``picture`` (PNG)."""
    print(format_tables(title, seeds, reports))
    plot_pooled(title, seeds, reports, picture)
    print(f"\nTable 4 picture: {picture}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--workdir", type=Path, default=ROOT, help="where runs/ is written (default: the repo)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny budgets, own directory")
    parser.add_argument("--skip-fashion-mnist", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--force", action="store_true", help="retrain what already finished")
    parser.add_argument(
        "--ari-only", action="store_true", help="only step 0: grouping methods on planted hierarchies"
    )
    parser.add_argument("--skip-capacity", action="store_true", help="skip step 3")
    parser.add_argument("--capacity-only", action="store_true", help="only step 3")
    parser.add_argument(
        "--select", action="store_true", help="step 3: choose its settings on validation (first seed) first"
    )
    parser.add_argument(
        "--demo", action="store_true", help="only step 3, at a small budget (2 seeds, 5-epoch specialists)"
    )
    args = parser.parse_args()
    # Lightning's per-run banners (devices, tips, summaries) would bury the tables.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)

    start = time.perf_counter()
    workdir = (args.workdir / "runs" / "benchmark_specialists_quick") if args.quick else args.workdir
    results: dict[str, Any] = {"quick": args.quick, "seeds": args.seeds}

    if args.demo or args.capacity_only:
        capacity_step(args, workdir, results)
        write_results(workdir, results, start)
        return

    # Step 0 needs no training: five seeds at least, whatever --seeds says for the trained runs.
    ari_seeds = sorted(set(args.seeds) | set(range(5)))
    results["grouping_ari"] = grouping_ari(ari_seeds)
    print(format_ari_table(results["grouping_ari"]))
    if args.ari_only:
        return

    if not args.skip_synthetic:
        # Two generalist widths: specialists add capacity where the generalist lacks it (16 hidden
        # units), and have little to add where it already nears the data's limit (64).
        for hidden in SYNTHETIC_WIDTHS:
            base = workdir / "runs" / "benchmark_specialists" / f"synthetic_mlp{hidden}"
            reports = [synthetic_run(seed, base / f"seed{seed}", args.quick, hidden) for seed in args.seeds]
            results[f"synthetic_mlp{hidden}"] = reports
            title = f"Synthetic: 50 classes in 10 planted groups, generalist and specialists MLP({hidden})"
            print_tables(title, args.seeds, reports, base / "table4.png")
            print(f"\nelapsed: {time.perf_counter() - start:.0f} s", flush=True)

    if not args.skip_fashion_mnist:
        from kd_lightning.datamodules import FashionMNIST

        if not FashionMNIST().available():
            print("\nFashion-MNIST files missing (run `make data`): skipped.")
        else:
            generalist = fashion_mnist_generalist(workdir, args.quick)
            groups_file = fashion_mnist_groups(workdir, generalist, args.quick)
            reports = [
                fashion_mnist_run(seed, workdir, generalist, groups_file, args.quick, args.force)
                for seed in args.seeds
            ]
            results["fashion_mnist"] = reports
            print_tables(
                "Fashion-MNIST: SmallCNN generalist (the main job's teacher)",
                args.seeds,
                reports,
                workdir / "runs" / "benchmark_specialists" / "fashion_mnist" / "table4.png",
            )
            for r in reports[:1]:
                print("\nper specialist (seed", args.seeds[0], "):")
                for s in r["specialists"]:
                    print(
                        f"  group {s['group']} {s['classes']}: test acc over its labels "
                        f"{100 * s['metrics'].get('test/acc', float('nan')):.2f}%, dustbin correction "
                        f"{s['dustbin_correction']:+.3f}, fit {s['fit_seconds']:.0f} s"
                    )

    if not args.skip_capacity:
        capacity_step(args, workdir, results)
    write_results(workdir, results, start)


def capacity_step(args: argparse.Namespace, workdir: Path, results: dict[str, Any]) -> None:
    """Step 3: the capacity-limited generalist with overlapping specialists (or its small-budget demo)."""
    overrides = QUICK if args.quick else []
    if args.demo:
        study = capacity_demo(
            workdir / "runs" / "benchmark_specialists" / "synthetic_capacity_demo", overrides
        )
        title = "demo: 2 seeds, specialists 5 epochs"
    else:
        where = workdir / "runs" / "benchmark_specialists" / "synthetic_capacity"
        setting = None
        if args.select:
            selection = choose_settings(args.seeds[0], where, overrides=overrides)
            results["capacity_selection"] = selection
            print(
                f"\n## Settings chosen on seed {args.seeds[0]}'s validation split (KL combination accuracy)\n"
            )
            for r in selection["rounds"]:
                scores = ", ".join(f"{label} {100 * v:.2f}%" for label, v in r["scores"].items())
                print(f"- {r['setting']}: {scores} -> {r['chosen']}")
            setting = selection["chosen"]
        study = capacity_study(args.seeds, where, setting, overrides)
        title = f"{len(args.seeds)} seeds"
    results["capacity"] = study
    print(f"\n## Capacity-limited generalist + overlapping specialists (synthetic, 100 classes), {title}\n")
    print(format_capacity_report(study), flush=True)


def write_results(workdir: Path, results: dict[str, Any], start: float) -> None:
    """Print the wall time and write every result to ``runs/benchmark_specialists/results.json``."""
    print(f"\nwall time: {time.perf_counter() - start:.0f} s")
    out = workdir / "runs" / "benchmark_specialists" / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
