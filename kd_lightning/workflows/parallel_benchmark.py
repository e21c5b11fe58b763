"""Latency of an ensemble's members evaluated by 1 or more worker processes against the sequential loop, with
the cost model's predictions for more workers: the runs behind ``scripts/benchmark_parallel_ensemble.py``.

Two member sets, randomly initialised (latency does not depend on the weights):

- ``cnn``: 4 SmallCNN [8, 16] head 64 on 28x28 images, batch 256: the CNN-8 members of docs/ensembles.md;
- ``specialists``: 10 MLPs of 16 hidden units on 32 features with 12 outputs (a group of 11 classes and the
  dustbin), batch 1,000: the capacity study's specialists, every one run on every input (the worst case:
  with top-1 activation each runs on about a tenth of them).

:func:`run_benchmark` times each set with :func:`kd_lightning.parallel.time_members` and
:func:`format_table` prints one table: measured rows for the worker counts run, predicted rows (the fitted
:class:`~kd_lightning.parallel.CostModel`) up to one worker per member.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

from torch import nn

from kd_lightning.models import MLP, SmallCNN
from kd_lightning.parallel import MemberTiming, time_members


@dataclass(frozen=True)
class MemberSet:
    """``count`` members built by ``make(input_shape, num_classes)``, timed on batches of ``batch_size``."""

    name: str
    make: Callable[[tuple[int, ...], int], nn.Module]
    count: int
    input_shape: tuple[int, ...]
    num_classes: int
    batch_size: int

    def members(self) -> list[nn.Module]:
        return [self.make(self.input_shape, self.num_classes).eval() for _ in range(self.count)]


MEMBER_SETS = (
    MemberSet("cnn", partial(SmallCNN, channels=(8, 16), head=64), 4, (1, 28, 28), 10, 256),
    MemberSet("specialists", partial(MLP, hidden=(16,)), 10, (32,), 12, 1000),
)
TINY_SETS = (MemberSet("tiny", partial(MLP, hidden=(8,)), 3, (8,), 4, 16),)


@dataclass(frozen=True)
class BenchmarkSettings:
    """What :func:`run_benchmark` measures; :meth:`tiny` is a seconds-long check of the plumbing."""

    sets: tuple[MemberSet, ...] = MEMBER_SETS
    workers: tuple[int, ...] = (1, 2)
    repeats: int = 30
    warmup: int = 5
    start_method: str = "spawn"
    threads: int = 1

    @classmethod
    def tiny(cls) -> BenchmarkSettings:
        return cls(sets=TINY_SETS, repeats=3, warmup=1, start_method="fork")


@dataclass
class SetResult:
    """One member set's timing."""

    set: MemberSet
    timing: MemberTiming
    rows: list[dict[str, object]] = field(default_factory=list)


def run_benchmark(settings: BenchmarkSettings) -> list[SetResult]:
    """Time every member set: the sequential loop and a pool of each of ``settings.workers``."""
    results = []
    for member_set in settings.sets:
        timing = time_members(
            member_set.members(),
            member_set.input_shape,
            workers=[w for w in settings.workers if w <= member_set.count],
            batch_size=member_set.batch_size,
            repeats=settings.repeats,
            warmup=settings.warmup,
            start_method=settings.start_method,
            threads=settings.threads,
        )
        results.append(SetResult(member_set, timing, table_rows(member_set.count, timing)))
    return results


def table_rows(count: int, timing: MemberTiming) -> list[dict[str, object]]:
    """One row per worker count from 1 to ``count``: measured where it was, the model's prediction always."""
    rows = []
    for workers in range(1, count + 1):
        measured = timing.parallel.get(workers)
        rows.append(
            {
                "workers": workers,
                "measured_ms": None if measured is None else 1e3 * measured,
                "model_ms": 1e3 * timing.model.predict(workers),
                "speedup": None if measured is None else timing.sequential / measured,
                "model_speedup": timing.sequential / timing.model.predict(workers),
            }
        )
    return rows


COLUMNS = (
    "member set",
    "members",
    "batch",
    "sequential (ms)",
    "workers",
    "measured (ms)",
    "speed-up (measured)",
    "cost model (ms)",
    "speed-up (model)",
)


def format_table(results: Sequence[SetResult]) -> str:
    """The results as one markdown table, then each set's fitted cost model."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for result in results:
        s, t = result.set, result.timing
        for row in result.rows:
            measured = "-" if row["measured_ms"] is None else f"{row['measured_ms']:.2f}"
            speedup = "-" if row["speedup"] is None else f"{row['speedup']:.2f}x"
            lines.append(
                f"| {s.name} | {s.count} | {s.batch_size} | {1e3 * t.sequential:.2f} | {row['workers']} "
                f"| {measured} | {speedup} | {row['model_ms']:.2f} | {row['model_speedup']:.2f}x |"
            )
    lines.append("")
    for result in results:
        s, t = result.set, result.timing
        members = ", ".join(f"{1e3 * x:.2f}" for x in t.member_seconds)
        lines.append(
            f"{s.name}: latency(W) = max over workers of its members' compute + {1e3 * t.model.a:.3f} ms "
            f"+ {1e3 * t.model.b:.3f} ms x W; members alone (ms): {members}; fitted on W = "
            f"{sorted(t.parallel)}"
        )
    return "\n".join(lines)
