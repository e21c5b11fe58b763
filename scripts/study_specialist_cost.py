"""Specialists against one bigger model (synthetic, 100 classes): generalist + specialists (same-size and
smaller) against single wider and deeper generalists, accuracy against FLOPs and latency, and a verdict.

    OMP_NUM_THREADS=1 python scripts/study_specialist_cost.py               # seeds 1 2; make study-specialist-cost
    OMP_NUM_THREADS=1 python scripts/study_specialist_cost.py --seeds 1 2 3
    python scripts/study_specialist_cost.py --quick                         # tiny plumbing check, seconds

With ``--jobs 2`` (the default) the seeds train in two processes at once, one core each (the tiny MLPs
gain nothing from a second thread), each writing its log beside the runs; then this process, alone,
reuses every finished stage and measures FLOPs and latency one model at a time.

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
import subprocess
import sys
import time
from pathlib import Path

from kd_lightning.workflows.specialist_cost import format_cost_report, specialist_cost

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 1 2 (--quick: 1)")
    parser.add_argument("--jobs", type=int, default=2, help="processes that train the seeds (default 2)")
    parser.add_argument("--train-only", action="store_true", help="train (or reuse) and stop: a job's part")
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
        seeds = args.seeds or [1]
    else:
        workdir = args.workdir / "runs" / "benchmark_specialists" / "synthetic_capacity"
        figure = args.figure or ROOT / "docs" / "images" / "specialist_cost.png"
        seeds = args.seeds or [1, 2]
    start = time.perf_counter()
    if args.train_only:
        specialist_cost(seeds, workdir, quick=args.quick, train_only=True, overrides=args.overrides)
        return
    if args.jobs > 1 and len(seeds) > 1:
        train_in_parallel(args, seeds, workdir)
    study = specialist_cost(seeds, workdir, figure=figure, quick=args.quick, overrides=args.overrides)
    print("\n## Generalist + specialists against single wider and deeper generalists\n")
    print(format_cost_report(study))
    print(f"\nfigure: {study['figure']}\nresults: {workdir / 'specialist_cost.json'}")
    print(f"wall time: {time.perf_counter() - start:.0f} s")


def train_in_parallel(args: argparse.Namespace, seeds: list[int], workdir: Path) -> None:
    """Train the seeds in ``args.jobs`` processes (seeds dealt round-robin), each logging to
    ``<workdir>/specialist_cost_job<k>.log``; raise if one fails (its finished stages are kept)."""
    workdir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for k in range(min(args.jobs, len(seeds))):
        mine = [str(s) for s in seeds[k :: args.jobs]]
        command = [sys.executable, __file__, "--train-only", "--workdir", str(args.workdir), "--seeds", *mine]
        command += ["--quick"] if args.quick else []
        command += ["--", *args.overrides] if args.overrides else []
        log = workdir / f"specialist_cost_job{k}.log"
        with log.open("wb") as sink:
            jobs.append((subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT), log))
        print(f"training seeds {' '.join(mine)} in process {jobs[-1][0].pid}; log: {log}", flush=True)
    try:
        codes = [(p.wait(), log) for p, log in jobs]
    finally:  # this process stopped (an error, Ctrl-C): stop the jobs too; their finished stages stay
        for p, _ in jobs:
            if p.poll() is None:
                p.terminate()
    failed = [(code, log) for code, log in codes if code != 0]
    if failed:
        tail = "\n".join(failed[0][1].read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(
            f"a training process exited with status {failed[0][0]}; the end of {failed[0][1]}:\n{tail}"
        )


if __name__ == "__main__":
    main()
