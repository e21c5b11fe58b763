"""Members of an ensemble evaluated by 1 or 2 worker processes against the sequential loop: one table.

    OMP_NUM_THREADS=1 python scripts/benchmark_parallel_ensemble.py          # both member sets, 1 and 2 workers
    python scripts/benchmark_parallel_ensemble.py --tiny                      # 3 tiny MLPs, seconds (plumbing)
    python scripts/benchmark_parallel_ensemble.py --workers 1 2 4 --repeats 50

Per member set (4 SmallCNN [8, 16] on 28x28 images, batch 256; 10 specialist-sized MLPs, batch 1,000): the
median latency of one batch through every member in this process (the sequential loop), and through pools
of worker processes (``kd_lightning.parallel.MemberPool``, one intra-op thread each), then the cost model
``latency(W) = max over workers of its members' compute + a + b W`` fitted to the measured pools and its
prediction up to one worker per member. Run it on a quiet machine: the workers need a core each. The runs
are :mod:`kd_lightning.workflows.parallel_benchmark`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from kd_lightning.workflows.parallel_benchmark import BenchmarkSettings, format_table, run_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny", action="store_true", help="3 tiny MLPs, 3 repeats (a check of the plumbing)"
    )
    parser.add_argument("--workers", type=int, nargs="+", help="worker counts measured (default 1 2)")
    parser.add_argument("--repeats", type=int, help="timed batches per measurement (default 30)")
    parser.add_argument("--warmup", type=int, help="untimed batches first (default 5)")
    parser.add_argument("--start-method", choices=["spawn", "forkserver", "fork"], help="default spawn")
    args = parser.parse_args()
    settings = BenchmarkSettings.tiny() if args.tiny else BenchmarkSettings()
    given = {
        "workers": None if args.workers is None else tuple(args.workers),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "start_method": args.start_method,
    }
    settings = dataclasses.replace(settings, **{k: v for k, v in given.items() if v is not None})
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"CPUs: {os.cpu_count()}, load average before (1, 5, 15 min): {load}; one intra-op thread per process\n"
    )
    print(format_table(run_benchmark(settings)), flush=True)


if __name__ == "__main__":
    main()
