"""Distil a generalist and its specialists, combined by KL minimisation, into one student of the generalist's size.

    OMP_NUM_THREADS=1 python scripts/distill_specialists.py             # 3 seeds, 2 processes side by side
    OMP_NUM_THREADS=1 python scripts/distill_specialists.py --jobs 1    # one process
    python scripts/distill_specialists.py --quick                        # tiny budgets, own directory: plumbing

In the capacity study's conditions (docs/specialists.md: a 16-unit MLP generalist on 100 confusable classes,
overlapping groups, 40-epoch specialists), per seed: the generalist and its specialists (the runs of
``scripts/benchmark_specialists.py --capacity-only``, same directory: reused when finished), then a student
with the generalist's network and recipe (configs/synthetic/distill_specialists.yaml) on the combination's
soft targets, which a ``SpecialistTeacher`` fills into a soft-target store once per seed. The temperature
(1, 2 or 4, hard-label weight 0.5) is chosen on the first seed's validation split. Prints, per seed and as
mean ± std: the generalist (= the student alone), the combination and its gain, the distilled student, and
the share of the gain it keeps. The workflow is
:func:`kd_lightning.workflows.specialist_distillation.distil_specialists` (also ``kd specialists-kd``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

from kd_lightning.workflows.ensemble_distillation import distillation_candidates
from kd_lightning.workflows.specialist_distillation import distil_specialists, format_distillation
from kd_lightning.workflows.specialist_study import QUICK

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--workdir", type=Path, default=ROOT, help="where runs/ is written (default: the repo)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="seeds run side by side (one process per core)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--hard-weights", type=float, nargs="+", default=[0.5])
    parser.add_argument("--quick", action="store_true", help="tiny budgets in their own directory (plumbing)")
    args = parser.parse_args()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    study = "benchmark_specialists_quick" if args.quick else "benchmark_specialists"
    workdir = args.workdir / "runs" / study / "synthetic_capacity"
    start = time.perf_counter()
    result = distil_specialists(
        args.seeds,
        workdir,
        candidates=distillation_candidates(args.temperatures, args.hard_weights),
        jobs=args.jobs,
        overrides=QUICK if args.quick else [],
    )
    wall = time.perf_counter() - start
    print(
        f"\n## Generalist + specialists distilled into one student (synthetic, 100 classes), seeds {args.seeds}\n"
    )
    print(format_distillation(result))
    print(f"\nwall time: {wall:.0f} s ({args.jobs} process(es))")
    report = workdir / "distillation.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({**dataclasses.asdict(result), "wall_seconds": round(wall, 1)}, indent=2))
    print(f"report: {report}")


if __name__ == "__main__":
    main()
