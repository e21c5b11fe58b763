"""Specialists against one bigger model (synthetic, 100 classes): generalist + specialists (same-size and
smaller) against single wider and deeper generalists, accuracy against FLOPs and latency, and a verdict.

    OMP_NUM_THREADS=1 python scripts/study_specialist_cost.py           # 3 seeds; make study-specialist-cost
    OMP_NUM_THREADS=1 python scripts/study_specialist_cost.py --seeds 1 2
    python scripts/study_specialist_cost.py --quick                     # tiny plumbing check, seconds

The workflow is :func:`kd_lightning.workflows.specialist_cost.specialist_cost` (also ``kd specialist-cost``);
its docstring defines the rows, the budget and the costs. Runs go to the capacity study's directory
(runs/benchmark_specialists/synthetic_capacity), so the generalists, the same-size specialists and the
64-unit references that ``scripts/benchmark_specialists.py --capacity-only`` trained are reused.
Prints the table and the verdict; the figure goes to docs/images/specialist_cost.png (``--quick``: the
quick run's own directory, runs/specialist_cost_quick).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from kd_lightning.workflows.specialist_cost import format_cost_report, specialist_cost

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--workdir", type=Path, default=ROOT, help="where runs/ is written (default: the repo)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny data and budgets, own directory")
    parser.add_argument("--figure", type=Path, help="default: docs/images/specialist_cost.png")
    parser.add_argument("overrides", nargs="*", help="kd arguments for every run, after --")
    args = parser.parse_args()
    # Lightning's per-run banners (devices, tips, summaries) would bury the table.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.quick:
        workdir = args.workdir / "runs" / "specialist_cost_quick"
        figure = args.figure or workdir / "specialist_cost.png"
        seeds = args.seeds[:1]
    else:
        workdir = args.workdir / "runs" / "benchmark_specialists" / "synthetic_capacity"
        figure = args.figure or ROOT / "docs" / "images" / "specialist_cost.png"
        seeds = args.seeds
    start = time.perf_counter()
    study = specialist_cost(seeds, workdir, figure=figure, quick=args.quick, overrides=args.overrides)
    print("\n## Generalist + specialists against single wider and deeper generalists\n")
    print(format_cost_report(study))
    print(f"\nfigure: {study['figure']}\nresults: {workdir / 'specialist_cost.json'}")
    print(f"wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
