"""Teacher memory and step time, fp32 against bf16, on this machine's CPU (side by side, one run).

    python scripts/benchmark_precision.py            # or: make benchmark-precision
    python scripts/benchmark_precision.py --batch 512 --steps 20

The teacher is configs/fashion_mnist/teacher.yaml's SmallCNN (16/32 channels, head 256), the student
distill.yaml's MLP 800-800, on Fashion-MNIST-shaped inputs (random: timing does not depend on pixels).
Rows:
- parameter bytes: the teacher's weights and buffers, as TeacherPlacement(dtype=...) leaves them;
- activation bytes: the sum of every layer's output for one batch (what a forward pass allocates);
- teacher forward: inference of one batch with the teacher as placed (fp32, or bf16 with autocast off);
- distillation step: student forward + backward + optimizer step, with the teacher's forward, under
  precision 32-true (fp32 teacher) and bf16-mixed (bf16 teacher), through a real Lightning Trainer.
Saves the figures to runs/benchmarks/precision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.callbacks.teacher_placement import TeacherPlacement
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.modules import DistillationModule

SHAPE = (1, 28, 28)


def teacher() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN(SHAPE, 10, channels=(16, 32), head=256, dropout=0.3).eval()


def param_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def activation_bytes(module: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def add(m, args, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * out.element_size()

    leaves = [m for m in module.modules() if not list(m.children())]
    handles = [m.register_forward_hook(add) for m in leaves]
    with torch.no_grad():
        module(x)
    for h in handles:
        h.remove()
    return total


def time_forward(module: nn.Module, x: torch.Tensor, steps: int) -> float:
    with torch.no_grad():
        for _ in range(2):
            module(x)
        start = time.perf_counter()
        for _ in range(steps):
            module(x)
    return (time.perf_counter() - start) / steps


class Timer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._t = warmup, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._t)


def time_distillation(precision: str, dtype: str | None, batch: int, steps: int) -> float:
    module = DistillationModule(partial(MLP, hidden=(800, 800)), 10, SHAPE, teacher=teacher())
    n = batch * (steps + 2)
    data = TensorDataset(torch.randn(n, *SHAPE), torch.randint(0, 10, (n,)), torch.arange(n))
    loader = DataLoader(data, batch_size=batch, collate_fn=_collate)
    timer = Timer(warmup=2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=steps + 2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[TeacherPlacement(dtype=dtype), timer],
    )
    trainer.fit(module, loader)
    return sum(timer.times) / len(timer.times)


def _collate(items):
    x, y, i = zip(*items, strict=True)
    return {"input": torch.stack(x), "target": torch.stack(y), "index": torch.stack(i)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    x = torch.randn(args.batch, *SHAPE)
    rows = {}
    for name, dtype in (("fp32", None), ("bf16", "bfloat16")):
        placed = TeacherPlacement(dtype=dtype)._place(teacher())
        rows[name] = {
            "parameter_bytes": param_bytes(placed),
            "activation_bytes": activation_bytes(placed.module, x.to(placed.dtype or torch.float32)),
            "teacher_forward_ms": 1000 * time_forward(placed, x, args.steps),
            "distillation_step_ms": 1000
            * time_distillation("32-true" if dtype is None else "bf16-mixed", dtype, args.batch, args.steps),
        }
    print(
        f"Teacher SmallCNN(16, 32; head 256), batch {args.batch}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(f"| {'':28} | {'fp32':>12} | {'bf16':>12} | {'bf16 / fp32':>11} |")
    print(f"|{'-' * 30}|{'-' * 14}|{'-' * 14}|{'-' * 13}|")
    labels = {
        "parameter_bytes": "teacher parameter bytes",
        "activation_bytes": "teacher activation bytes",
        "teacher_forward_ms": "teacher forward (ms/batch)",
        "distillation_step_ms": "distillation step (ms)",
    }
    for key, label in labels.items():
        a, b = rows["fp32"][key], rows["bf16"][key]
        fmt = "{:>12,.0f}" if "bytes" in key else "{:>12.1f}"
        print(f"| {label:28} | {fmt.format(a)} | {fmt.format(b)} | {b / a:>11.2f} |")
    out = Path("runs/benchmarks/precision.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"batch": args.batch, "threads": torch.get_num_threads(), **rows}, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
