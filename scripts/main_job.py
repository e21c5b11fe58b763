"""The main job on Fashion-MNIST: teacher, the student alone, the distilled student; prints one table.

    python scripts/main_job.py            # or: make demo
    python scripts/main_job.py --force    # recompute finished stages

Each stage is ``kd fit --config configs/fashion_mnist/<stage>.yaml`` followed by ``kd test``;
outputs land in ``runs/fashion_mnist/<stage>/`` and a finished stage is reused. Arguments after
``--`` are passed to every stage (e.g. ``-- --trainer.max_epochs=1`` for a quick look).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd_lightning.pipeline import format_table, run_stage  # noqa: E402

STAGES = [
    ("teacher (CNN)", "teacher.yaml"),
    ("student alone (MLP)", "student.yaml"),
    ("distilled student (MLP, cached soft targets)", "distill_cached.yaml"),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default=str(ROOT), help="where runs/ is written (default: the repo)")
    parser.add_argument("--force", action="store_true", help="recompute stages that already finished")
    parser.add_argument("overrides", nargs="*", help="kd arguments for every stage, after --")
    args = parser.parse_args()

    start = time.perf_counter()
    rows = []
    for name, config in STAGES:
        print(f"\n=== {name}: kd fit --config configs/fashion_mnist/{config}", flush=True)
        rows.append(
            run_stage(
                name, ROOT / "configs" / "fashion_mnist" / config, args.workdir, args.overrides, args.force
            )
        )
    wall = time.perf_counter() - start

    table = format_table(rows)
    teacher, alone, distilled = rows
    print("\nFashion-MNIST test accuracy (10,000 test images)\n")
    print(table)
    print(
        f"\ndistillation gain over the student alone: {100 * (distilled.test_acc - alone.test_acc):+.2f} points; "
        f"teacher-student agreement {100 * distilled.metrics.get('test/agreement', float('nan')):.2f}%"
    )
    print(f"wall time: {wall:.0f} s")
    out = Path(args.workdir) / "runs" / "fashion_mnist" / "main_job.json"
    out.write_text(json.dumps({"rows": [asdict(r) for r in rows], "wall_seconds": round(wall, 1)}, indent=2))


if __name__ == "__main__":
    main()
