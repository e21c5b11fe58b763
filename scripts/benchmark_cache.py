"""Benchmark of the soft-target cache on Fashion-MNIST: time, throughput, bytes and accuracy, side by side.

    python scripts/benchmark_cache.py            # the full benchmark (15 epochs per student)
    python scripts/benchmark_cache.py --quick    # a smoke run on a sliver of the data (a few minutes)
    python scripts/benchmark_cache.py --timing   # only 1.: the interleaved timing (about 5 minutes)
    python scripts/benchmark_cache.py --timing --quick   # its smoke run (seconds)

Uses the shipped configs: the teacher of configs/fashion_mnist/teacher.yaml (its checkpoint
runs/fashion_mnist/teacher/seed0/checkpoints/final.ckpt, written by scripts/main_job.py, is reused; trained
here if missing), the 800-800 MLP student of student.yaml, online distillation with distill.yaml and
cached distillation with distill_cached.yaml. Every student has the same seed, recipe and budget.

Prints (does not assert):

1. the step time of cached distillation against the student alone and against a hand-written PyTorch
   loop on in-memory tensors, with soft targets gathered in the training process (``gather_in=main``)
   and where the loader makes the batch (``gather_in=loader``), and the share of a step spent on soft
   targets: variants interleaved in rotated rounds, ratios of per-epoch medians, validation excluded
   (kd_lightning.workflows.cache_timing; target for cached: <= 1.02); then online distillation's
   epoch time over the student alone's (median over epochs of the runs below);
2. store build throughput over plain teacher inference throughput on the same images and batch size
   (best of ``--repeats``; target >= 0.9);
3. bytes per sample of each format, and the distilled student's test accuracy with full logits and with
   top-k (k = 1, 3, 5) soft targets (target: top-5 within 0.2 points of full logits);
4. what verifying the training store costs when a run opens it (checksums and finiteness, one read
   pass), from disk (evicted from the page cache first) and from memory: seconds, GB/s, and as a share
   of one cached-distillation epoch.

    python scripts/benchmark_cache.py --verify-synthetic 1281167 1000   # only 4., on a synthetic store

Writes everything to ``<workdir>/benchmark_cache.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from kd_lightning.callbacks import SoftTargetCache
from kd_lightning.cli import main as kd
from kd_lightning.modules import load_teacher
from kd_lightning.store import Encoding, SoftTargetStore, StoreWriter
from kd_lightning.workflows.cache_timing import GATHER_PATHS, EpochClock, TimingSettings, cache_timing
from kd_lightning.workflows.stage import run_stage, working_directory

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = ROOT / "configs" / "fashion_mnist"
TEACHER_CKPT = ROOT / "runs" / "fashion_mnist" / "teacher" / "seed0" / "checkpoints" / "final.ckpt"
QUICK = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=20",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=5",
    "--data.init_args.train_fraction=0.1",
    "--data.init_args.val_size=500",
]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@dataclass
class Run:
    """One student's training run."""

    name: str
    test_acc: float
    epoch_seconds: list[float]
    store: dict[str, float] = field(default_factory=dict)  # build stats of its training store
    store_bytes: int | None = None  # the whole store directory of the training split, on disk

    @property
    def epoch_time(self) -> float:
        # The first epoch pays one-off costs (allocator warm-up, page cache); skip it when there are more.
        times = self.epoch_seconds[1:] if len(self.epoch_seconds) > 1 else self.epoch_seconds
        return statistics.median(times)


def train(name: str, config: str, workdir: Path, overrides: list[str]) -> Run:
    """Fit and test ``config`` in ``workdir/name`` with ``overrides``; time its training epochs."""
    print(f"\n=== {name}: kd fit --config configs/fashion_mnist/{config} {' '.join(overrides)}", flush=True)
    with working_directory(workdir / name.replace(" ", "_").replace(",", "")):
        cli = kd(["--config", str(CONFIGS / config), *overrides], run=False)
        timer = EpochClock()
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
        cache = next((c for c in cli.trainer.callbacks if isinstance(c, SoftTargetCache)), None)
    run = Run(name, float(metrics["test/acc"]), [round(s, 3) for s in timer.seconds])
    if cache is not None:
        run.store = cache.build_stats.get("train", {})
        store = Path(cache.path) / "train"
        run.store_bytes = sum(p.stat().st_size for p in store.iterdir())
    print(f"    test acc {100 * run.test_acc:.2f}%, epoch {run.epoch_time:.2f} s", flush=True)
    return run


def throughput(
    teacher_ckpt: Path, workdir: Path, overrides: list[str], repeats: int, batch_size: int
) -> dict:
    """Images per second of plain teacher inference and of a store build, on the training split."""
    with working_directory(workdir / "throughput"):
        cli = kd(["--config", str(CONFIGS / "distill_cached.yaml"), *overrides], run=False)
    dm = cli.datamodule
    dm.setup("fit")
    teacher = load_teacher(teacher_ckpt)
    images = Subset(dm.train_set.source, dm.train_set.indices.tolist())
    n = len(images)

    def plain() -> float:
        # What anyone would write to run a teacher over a dataset: a DataLoader and inference_mode.
        loader = DataLoader(images, batch_size=batch_size, num_workers=dm.num_workers)
        start = time.perf_counter()
        with torch.inference_mode():
            for x, _ in loader:
                teacher(x)
        return time.perf_counter() - start

    def build() -> float:
        path = workdir / "throughput" / "store"
        shutil.rmtree(path, ignore_errors=True)
        cache = SoftTargetCache(
            str(path),
            dtype="float16",
            splits=["train"],
            batch_size=batch_size,
            teacher_ckpt=str(teacher_ckpt),
        )
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            precision="32-true",
            max_epochs=1,
            limit_train_batches=0,  # fit only to run the callback's build at fit start
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[cache],
            default_root_dir=workdir / "throughput",
        )
        trainer.fit(cli.model, datamodule=dm)
        return cache.build_stats["train"]["seconds"]

    plain_s, build_s = [], []
    for _ in range(repeats):  # interleaved, so that a noisy neighbour slows both alike
        plain_s.append(plain())
        build_s.append(build())
    return {
        "images": n,
        "num_classes": dm.num_classes,
        "batch_size": batch_size,
        "plain_seconds": [round(s, 3) for s in plain_s],
        "build_seconds": [round(s, 3) for s in build_s],
        "plain_per_s": n / min(plain_s),
        "build_per_s": n / min(build_s),
    }


def _evict(path: Path) -> bool:
    """Drop the store's files from the page cache (so the next read comes from disk); False if unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for file in path.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def verification_cost(store_path: Path, epoch_seconds: float | None, repeats: int = 2) -> dict:
    """Seconds to verify the store at ``store_path`` as a run opening it does, cold (from disk) and warm.

    ``SoftTargetStore.open`` reads every array once (SHA-256 and finiteness); this times that pass,
    best of ``repeats``, after evicting the files from the page cache and then with them cached.
    """
    store = SoftTargetStore.open(store_path, verify=False)
    size = sum(p.stat().st_size for p in store_path.iterdir() if p.name != "header.json")
    out: dict = {"path": str(store_path), "bytes": size, "rows": len(store), "classes": store.num_classes}
    for cache in ("cold", "warm"):
        times = []
        for _ in range(repeats):
            if cache == "cold" and not _evict(store_path):
                break
            start = time.perf_counter()
            store.verify()
            times.append(time.perf_counter() - start)
        if times:
            out[f"{cache}_seconds"] = min(times)
            out[f"{cache}_gb_per_s"] = size / min(times) / 1e9
            if epoch_seconds:
                out[f"{cache}_share_of_epoch"] = min(times) / epoch_seconds
    out["epoch_seconds"] = epoch_seconds
    return out


def synthetic_store(path: Path, rows: int, classes: int, chunk: int = 1 << 16) -> Path:
    """An fp16 logits store of ``rows`` x ``classes`` random logits at ``path`` (replaced if there)."""
    writer = StoreWriter.create(path, Encoding("logits", "float16"), classes, np.arange(rows), 1, {})
    g = torch.Generator().manual_seed(0)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        writer.write(0, start, 3 * torch.randn(n, classes, generator=g))
    writer.commit({"synthetic": True})
    return path


def print_verification(costs: list[dict]) -> None:
    print("\n4. Verifying a store at open (SHA-256 and finiteness, one read pass; best of 2)\n")
    print(
        "| store | GB | from disk (s) | GB/s | from memory (s) | GB/s | share of one epoch (disk / memory) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c in costs:
        share = (
            f"{c['cold_share_of_epoch']:.2%} / {c['warm_share_of_epoch']:.2%} of {c['epoch_seconds']:.2f} s"
            if c.get("epoch_seconds") and "cold_seconds" in c
            else ""
        )
        cold = f"{c['cold_seconds']:.3f} | {c['cold_gb_per_s']:.2f}" if "cold_seconds" in c else "| "
        print(
            f"| {c['rows']:,} x {c['classes']} fp16 logits | {c['bytes'] / 1e9:.3f} | {cold} | "
            f"{c['warm_seconds']:.3f} | {c['warm_gb_per_s']:.2f} | {share} |"
        )


def timing_report(args: argparse.Namespace, workdir: Path):
    """Run and print 1., the interleaved timing (kd_lightning.workflows.cache_timing)."""
    quick = {"rounds": 2, "epochs": 2, "batches": 5} if args.quick else {}
    chosen = {"rounds": args.rounds, "epochs": args.epochs, "batches": args.batches}
    settings = TimingSettings(
        **{**quick, **{k: v for k, v in chosen.items() if v is not None}},
        gather_in=GATHER_PATHS if args.soft_target_path == "both" else (args.soft_target_path,),
        teacher_ckpt=args.teacher_ckpt,
        threads=args.threads,
        num_workers=args.num_workers,
    )
    print("\n=== 1. timing: student alone, cached, hand-written loop, interleaved", flush=True)
    report = cache_timing(workdir / "timing", settings)
    print(f"\n1. Step time, Fashion-MNIST, {'-'.join(map(str, settings.hidden))} MLP student\n")
    print(report.markdown(), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: a sliver of the data, 2 short epochs"
    )
    parser.add_argument("--workdir", default=None, help="default: runs/benchmark_cache[_quick] in the repo")
    parser.add_argument("--teacher-ckpt", default=None, help=f"default: {TEACHER_CKPT.relative_to(ROOT)}")
    parser.add_argument("--topk", type=int, nargs="*", default=[1, 3, 5], help="k of the top-k stores")
    parser.add_argument(
        "--views", type=int, default=0, help="also run augmentation-consistent mode with V views"
    )
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the throughput measurement")
    parser.add_argument(
        "--batch-size", type=int, default=1024, help="teacher batch size, build and inference"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--verify-synthetic",
        type=int,
        nargs=2,
        metavar=("ROWS", "CLASSES"),
        default=None,
        help="only measure verification at open, on a synthetic fp16 store of ROWS x CLASSES logits",
    )
    timing = parser.add_argument_group("timing (1.; alone with --timing)")
    timing.add_argument("--timing", action="store_true", help="only the interleaved timing of 1.")
    timing.add_argument(
        "--rounds", type=int, default=None, help="rounds of every variant (default 5; quick 2)"
    )
    timing.add_argument(
        "--epochs", type=int, default=None, help="epochs per variant and round (default 3; quick 2)"
    )
    timing.add_argument("--batches", type=int, default=None, help="batches per epoch (default 150; quick 5)")
    timing.add_argument(
        "--soft-target-path",
        choices=[*GATHER_PATHS, "both"],
        default="both",
        help="where the cached variant gathers soft targets (both: before/after, side by side)",
    )
    timing.add_argument(
        "--num-workers", type=int, default=None, help="DataLoader workers (default: the policy, 0 on a CPU)"
    )
    parser.add_argument("overrides", nargs="*", help="kd arguments for every student, after --")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # the kd runs below get their arguments explicitly
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    workdir = Path(
        args.workdir or ROOT / "runs" / ("benchmark_cache_quick" if args.quick else "benchmark_cache")
    )
    workdir = workdir.resolve()
    if args.timing:
        report = timing_report(args, workdir)
        (workdir / "cache_timing.json").write_text(json.dumps(report.as_json(), indent=2))
        print(f"wall time: {time.perf_counter() - start:.0f} s; saved {workdir / 'cache_timing.json'}")
        return
    if args.verify_synthetic:
        rows, classes = args.verify_synthetic
        path = synthetic_store(workdir / "verify_synthetic" / "train", rows, classes)
        print_verification([verification_cost(path, None)])
        shutil.rmtree(path.parent)
        return
    common = [*(QUICK if args.quick else []), *QUIET, *args.overrides]

    teacher_ckpt = Path(args.teacher_ckpt) if args.teacher_ckpt else None
    if teacher_ckpt is None:
        if args.quick:
            teacher_ckpt = Path(
                run_stage("teacher", CONFIGS / "teacher.yaml", workdir, [*QUICK, *QUIET]).checkpoint
            )
        elif TEACHER_CKPT.is_file():
            teacher_ckpt = TEACHER_CKPT
        else:
            print(f"no teacher at {TEACHER_CKPT}: training it as scripts/main_job.py does", flush=True)
            teacher_ckpt = Path(run_stage("teacher (CNN)", CONFIGS / "teacher.yaml", ROOT).checkpoint)
    teacher_ckpt = teacher_ckpt.resolve()
    stores = workdir / "stores"
    shutil.rmtree(stores, ignore_errors=True)  # every cached run below builds its store afresh

    def cached(fmt: str, *extra: str) -> list[str]:
        return [
            *common,
            f"--trainer.callbacks.path={stores / fmt}",
            f"--trainer.callbacks.teacher_ckpt={teacher_ckpt}",
            f"--trainer.callbacks.batch_size={args.batch_size}",
            *(["--trainer.callbacks.splits=[train,val]"] if args.quick else []),
            *extra,
        ]

    runs: dict[str, Run] = {}
    # The three of the time comparison first and back to back, so that they share the machine's state.
    runs["alone"] = train("student alone", "student.yaml", workdir, common)
    runs["logits-float16"] = train(
        "cached, logits fp16", "distill_cached.yaml", workdir, cached("logits-float16")
    )
    runs["online"] = train(
        "online distillation",
        "distill.yaml",
        workdir,
        [*common, f"--model.init_args.teacher_ckpt={teacher_ckpt}"],
    )
    runs["logits-float32"] = train(
        "cached, logits fp32",
        "distill_cached.yaml",
        workdir,
        cached("logits-float32", "--trainer.callbacks.dtype=float32"),
    )
    for k in args.topk:
        runs[f"top{k}-float16"] = train(
            f"cached, top-{k} fp16",
            "distill_cached.yaml",
            workdir,
            cached(f"top{k}-float16", "--trainer.callbacks.kind=topk", f"--trainer.callbacks.top_k={k}"),
        )
    if args.views:
        runs[f"views{args.views}"] = train(
            f"cached, {args.views} augmentation views",
            "distill_cached.yaml",
            workdir,
            cached(
                f"views{args.views}",
                f"--trainer.callbacks.views={args.views}",
                "--data.init_args.augment_seed=0",
                f"--data.init_args.augment_views={args.views}",
            ),
        )
    print("\n=== throughput: plain teacher inference vs store build (training split)", flush=True)
    speed = throughput(teacher_ckpt, workdir, common, args.repeats, args.batch_size)

    alone, online, fast = runs["alone"], runs["online"], runs["logits-float16"]
    timing = timing_report(args, workdir)
    print("\nFashion-MNIST, 800-800 MLP student, same seed, recipe and budget; teacher", teacher_ckpt)
    print(
        f"\n1b. Training epoch time of the runs below (median, validation excluded), torch threads: "
        f"{torch.get_num_threads()}\n"
    )
    print("| run | epoch (s) | / student alone |")
    print("|---|---:|---:|")
    for run in (alone, fast, online):
        print(f"| {run.name} | {run.epoch_time:.2f} | {run.epoch_time / alone.epoch_time:.3f} |")

    ratio = speed["build_per_s"] / speed["plain_per_s"]
    print(
        f"\n2. Teacher throughput on {speed['images']:,} training images, batch {speed['batch_size']} (best of {args.repeats})\n"
    )
    print("| | images/s |")
    print("|---|---:|")
    print(f"| plain teacher inference | {speed['plain_per_s']:,.0f} |")
    print(f"| store build (logits fp16) | {speed['build_per_s']:,.0f} |")
    print(f"| ratio build / plain | {ratio:.3f} (target >= 0.9) |")

    full = runs["logits-float32"]
    print("\n3. Formats: bytes per training sample and the distilled student's test accuracy\n")
    print("| format | payload B/sample | on disk B/sample | test acc (%) | vs fp32 logits (points) |")
    print("|---|---:|---:|---:|---:|")
    for run in runs.values():
        if not run.store:
            continue
        n = run.store["samples"] * run.store["views"]
        payload = run.store["bytes"] / n
        disk = run.store_bytes / n
        print(
            f"| {run.name.removeprefix('cached, ')} | {payload:.1f} | {disk:.1f} | {100 * run.test_acc:.2f} | "
            f"{100 * (run.test_acc - full.test_acc):+.2f} |"
        )
    # bf16 costs what fp16 does on disk; it is not trained on here.
    bf16 = Encoding("logits", "bfloat16").bytes_per_sample(speed["num_classes"])
    print(f"| logits bf16 (size only) | {bf16:.1f} | {bf16 + 8:.1f} | | |")
    print(
        f"\nstudent alone {100 * alone.test_acc:.2f}%, online distillation {100 * online.test_acc:.2f}%; "
        "on-disk bytes include the 8-byte sample index (the header is ~3 KB per store)"
    )
    if "top5-float16" in runs:
        gap = 100 * (runs["top5-float16"].test_acc - full.test_acc)
        print(f"top-5 minus full logits: {gap:+.2f} points (target: within 0.2)")
    verify = verification_cost(stores / "logits-float16" / "train", fast.epoch_time)
    print_verification([verify])
    wall = time.perf_counter() - start
    print(f"wall time: {wall:.0f} s")
    out = workdir / "benchmark_cache.json"
    out.write_text(
        json.dumps(
            {
                "runs": {k: {**asdict(r), "epoch_time": r.epoch_time} for k, r in runs.items()},
                "throughput": {**speed, "ratio": ratio},
                "verification": verify,
                "timing": timing.as_json(),
                "torch_threads": torch.get_num_threads(),
                "wall_seconds": round(wall, 1),
            },
            indent=2,
        )
    )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
