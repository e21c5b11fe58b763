"""Distillation at accelerator speed: images/s, peak memory and data-loading wait, one table.

    python scripts/benchmark_gpu.py                  # or: make benchmark-gpu (a GPU when there is one)
    python scripts/benchmark_gpu.py --tiny           # tiny networks, a few steps on the CPU (seconds)
    python scripts/benchmark_gpu.py --out runs/benchmarks/gpu.md   # also writes gpu.md and gpu.json

For resnet32x4 -> resnet8x4 and wrn_40_2 -> wrn_16_2 on CIFAR-100 (under --data-dir, nothing downloaded)
or random CIFAR-shaped tensors: the student alone, online distillation (fp32, bf16-mixed, teacher in bf16 +
channels_last, + torch.compile), cached distillation, and the store build against plain teacher inference,
with ratios to the student alone and the FLOP limit 1 + F_teacher / (3 F_student). What each column means:
kd_lightning/workflows/gpu_benchmark.py and docs/gpu.md.
"""

from __future__ import annotations

import argparse

from kd_lightning.workflows.gpu_benchmark import (
    BenchmarkSettings,
    run_benchmark,
    with_overrides,
    write_report,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny networks, 1 + 3 steps of 8 images, CPU")
    parser.add_argument(
        "--out", help="write the table to this .md (or .json) file, and the other format beside it"
    )
    parser.add_argument("--workdir", default="runs/benchmarks/gpu", help="Trainers' and stores' directory")
    parser.add_argument("--batch-size", type=int, help="training batch size (default 256; tiny 8)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 20; tiny 1)")
    parser.add_argument("--steps", type=int, help="timed steps (default 100; tiny 3)")
    parser.add_argument("--accelerator", help="Lightning accelerator (default auto; tiny cpu)")
    parser.add_argument("--data-dir", help="directory holding cifar-100-python/ (default data)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = parser.parse_args()
    settings = with_overrides(
        BenchmarkSettings.tiny_cpu() if args.tiny else BenchmarkSettings(),
        batch_size=args.batch_size,
        warmup=args.warmup,
        steps=args.steps,
        accelerator=args.accelerator,
        data_dir=args.data_dir,
        compile=False if args.no_compile else None,
    )
    report = run_benchmark(settings, args.workdir)
    print(report.markdown(), flush=True)
    if args.out:
        for path in write_report(report, args.out):
            print(f"saved {path}")


if __name__ == "__main__":
    main()
