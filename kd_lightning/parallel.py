"""Members of an ensemble or of a specialist set evaluated in parallel, one worker process per share of them.

:func:`run_members` is the sequential loop (each member's fp32 outputs, one after another);
:class:`MemberPool` runs the same loop in ``workers`` processes (``torch.multiprocessing``), each holding
some of the members: every batch is copied into a shared-memory buffer (sent to the workers once, refilled
while the batches keep their shape), every worker computes its members' outputs on it, and the outputs come
back through a pipe, in the members' order. A worker runs
exactly :func:`run_members` on its share, so the outputs equal the sequential ones.

Why processes and not one of Lightning's strategies: Lightning's strategies (DDP, FSDP, DeepSpeed) are
*data*-parallel, every process holding the whole model and a shard of the batches, which is already
what ``kd test --trainer.devices=N`` and a store fill under DDP do with an ensemble. What costs latency
per batch, when an ensemble or a generalist with its specialists teaches live, is that the members run
one after another on the *same* batch; the remedy is *member* parallelism, which no Lightning strategy
offers (its ``ModelParallelStrategy`` shards tensors of one network across GPUs).

:func:`time_members` measures the sequential loop and pools of ``1 .. M`` workers (medians of repeated
batches after warm-up) and fits :class:`CostModel`: ``latency(W) ~ max over workers of the members'
compute + a + b W`` (``a + b W``: copying the batch in, waking the workers, bringing the outputs back,
one worker after another), from which it predicts more workers.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import Tensor, nn

Rows = Sequence[Tensor | None] | None


class WorkerError(RuntimeError):
    """A worker of a :class:`MemberPool` failed: a member raised (the worker's traceback is in the
    message), the worker died, or it did not answer in time."""


def run_members(members: Sequence[nn.Module], x: Tensor, rows: Rows = None) -> list[Tensor | None]:
    """Each member's fp32 outputs on ``x`` (member ``k`` on ``x[rows[k]]`` when ``rows`` is given), one after
    another, without gradients: the sequential loop, and what each worker of a :class:`MemberPool` runs.

    Args:
        members: the networks.
        x: one batch ``(N, ...)``.
        rows: ``None`` (every member on every row), or one entry per member: the row indices it runs on,
            or ``None`` for all rows. An empty selection gives ``None`` (the member does not run).

    Raises:
        ValueError: ``rows`` does not have one entry per member.

    Example:
        >>> outs = run_members([nn.Linear(2, 3), nn.Linear(2, 1)], torch.zeros(4, 2), [None, torch.tensor([0])])
        >>> [tuple(o.shape) for o in outs]
        [(4, 3), (1, 1)]
    """
    if rows is not None and len(rows) != len(members):
        raise ValueError(f"`rows` must have one entry per member ({len(members)}), got {len(rows)}.")
    outputs: list[Tensor | None] = []
    with torch.no_grad():
        for k, member in enumerate(members):
            selected = None if rows is None else rows[k]
            if selected is None:
                outputs.append(member(x).float())
            elif selected.numel():
                outputs.append(member(x[selected]).float())
            else:
                outputs.append(None)
    return outputs


def assign_members(costs: Sequence[float], workers: int) -> list[list[int]]:
    """Share members among ``workers`` so that the largest total cost is small: each member, most costly
    first, goes to the least loaded worker (longest-processing-time first). Ties go to the lower index.

    Returns:
        One sorted list of member indices per worker.

    Raises:
        ValueError: ``workers`` is not in ``[1, len(costs)]``.

    Example:
        >>> assign_members([3.0, 1.0, 1.0, 1.0], 2)
        [[0], [1, 2, 3]]
        >>> assign_members([1.0] * 5, 2)
        [[0, 2, 4], [1, 3]]
    """
    if not (isinstance(workers, int) and 1 <= workers <= len(costs)):
        raise ValueError(
            f"`workers` must be an integer in [1, {len(costs)}] (one member at least each), got {workers!r}."
        )
    load = [0.0] * workers
    shares: list[list[int]] = [[] for _ in range(workers)]
    for k in sorted(range(len(costs)), key=lambda k: -costs[k]):
        w = min(range(workers), key=lambda w: (load[w], w))
        shares[w].append(k)
        load[w] += costs[k]
    return [sorted(share) for share in shares]


def _serve(
    conn: Connection, members: list[nn.Module], names: list[int], threads: int, device: str | None
) -> None:
    """A worker's loop: receive ``(buffer or None, rows)``, answer ``("ok", outputs)`` or ``("error", text)``.

    The batch lives in a shared-memory buffer sent once and reused while its shape stays (``None``: the
    same buffer, refilled); rows and outputs travel by value (numpy arrays), which costs less than a
    shared-memory handle per small tensor. ``None`` stops the worker.
    """
    torch.set_num_threads(threads)
    if device is not None:
        members = [m.to(device) for m in members]
    for member in members:
        member.eval()
    batch = None
    while True:
        request = conn.recv()
        if request is None:
            return
        buffer, rows = request
        batch = buffer if buffer is not None else batch
        try:
            x = batch if device is None else batch.to(device)
            selected = (
                None
                if rows is None
                else [None if r is None else torch.from_numpy(r).to(x.device) for r in rows]
            )
            outputs = run_members(members, x, selected)
            conn.send(("ok", [None if o is None else o.cpu().numpy() for o in outputs]))
        except Exception:  # reported to the caller, which raises WorkerError with this text
            conn.send(
                (
                    "error",
                    f"members {names} on a batch of shape {tuple(batch.shape)}:\n{traceback.format_exc()}",
                )
            )


@dataclass
class _Worker:
    process: Any
    conn: Connection
    members: list[int]


class MemberPool:
    """Members evaluated in parallel by worker processes, each holding a share of them (a context manager).

    Each worker gets its members once, at start (pickled: parameters travel through shared memory), and
    then, for every :meth:`run`, the batch (in a shared-memory buffer) and its rows; it runs
    :func:`run_members` on its share with ``threads`` intra-op threads, and the outputs come back in the
    members' order. With ``devices``, worker ``w`` moves its members and each batch to ``devices[w]`` and
    returns CPU tensors (one GPU per worker; use the ``spawn`` start method there).

    Args:
        members: the networks (e.g. an :class:`~kd_lightning.ensemble.Ensemble`'s ``members``, or a
            generalist's specialists).
        workers: number of processes, in ``[1, len(members)]``.
        costs: relative cost of each member, to balance the shares (:func:`assign_members`); default equal.
        threads: intra-op threads of each worker (``torch.set_num_threads``); workers x threads should not
            exceed the cores.
        devices: one device per worker (``"cuda:0"``, ...); default the CPU.
        start_method: ``"spawn"`` (the default: safe with threads and CUDA), ``"forkserver"`` or ``"fork"``.
        timeout: seconds to wait for a worker's answer before :class:`WorkerError`.

    Raises:
        ValueError: no members, a bad ``workers``/``threads``/``timeout``, or ``devices`` not one per worker.

    Example:
        >>> members = [nn.Linear(4, 3) for _ in range(3)]
        >>> x = torch.randn(5, 4)
        >>> with MemberPool(members, workers=2, start_method="fork") as pool:  # doctest: +SKIP
        ...     outputs = pool.run(x)
        >>> all(torch.equal(a, b) for a, b in zip(outputs, run_members(members, x)))  # doctest: +SKIP
        True
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        workers: int,
        *,
        costs: Sequence[float] | None = None,
        threads: int = 1,
        devices: Sequence[str] | None = None,
        start_method: str = "spawn",
        timeout: float = 600.0,
    ) -> None:
        if not members:
            raise ValueError("`members` is empty: give at least one network.")
        if costs is not None and len(costs) != len(members):
            raise ValueError(f"`costs` must have one entry per member ({len(members)}), got {len(costs)}.")
        if not (isinstance(threads, int) and threads >= 1):
            raise ValueError(f"`threads` must be a positive integer, got {threads!r}.")
        if not timeout > 0:
            raise ValueError(f"`timeout` must be > 0 seconds, got {timeout!r}.")
        self.assignment = assign_members([1.0] * len(members) if costs is None else list(costs), workers)
        if devices is not None and len(devices) != workers:
            raise ValueError(f"`devices` must name one device per worker ({workers}), got {list(devices)}.")
        self.num_members, self.timeout = len(members), timeout
        context = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self._buffer: Tensor | None = None
        try:
            for w, share in enumerate(self.assignment):
                parent, child = context.Pipe()
                device = None if devices is None else str(devices[w])
                process = context.Process(
                    target=_serve,
                    args=(child, [members[k] for k in share], share, threads, device),
                    name=f"kd-member-worker-{w}",
                    daemon=True,
                )
                process.start()
                child.close()
                self._workers.append(_Worker(process, parent, share))
        except BaseException:
            self.close()
            raise

    @property
    def workers(self) -> int:
        return len(self.assignment)

    def run(self, x: Tensor, rows: Rows = None) -> list[Tensor | None]:
        """Every member's fp32 outputs on ``x`` (or its ``rows``), as :func:`run_members` returns them.

        Raises:
            WorkerError: a member raised in its worker (its traceback is quoted), a worker died, or one did
                not answer within ``timeout``; the pool is closed when a worker died or timed out.
            RuntimeError: the pool is closed.
        """
        if not self._workers:
            raise RuntimeError("this MemberPool is closed.")
        if rows is not None and len(rows) != self.num_members:
            raise ValueError(f"`rows` must have one entry per member ({self.num_members}), got {len(rows)}.")
        fresh = self._buffer is None or self._buffer.shape != x.shape or self._buffer.dtype != x.dtype
        if fresh:  # sent once; the workers keep it while batches keep this shape
            self._buffer = torch.empty(x.shape, dtype=x.dtype).share_memory_()
        self._buffer.copy_(x.detach())
        for worker in self._workers:
            share = (
                None
                if rows is None
                else [None if rows[k] is None else rows[k].cpu().numpy() for k in worker.members]
            )
            worker.conn.send((self._buffer if fresh else None, share))
        outputs: list[Tensor | None] = [None] * self.num_members
        errors = []
        for w, worker in enumerate(self._workers):
            status, payload = self._answer(w, worker)
            if status == "error":
                errors.append(f"worker {w}, {payload}")
                continue
            for k, out in zip(worker.members, payload, strict=True):
                outputs[k] = None if out is None else torch.from_numpy(out).to(x.device)
        if errors:
            raise WorkerError("a member failed in its worker process: " + "\n".join(errors))
        return outputs

    def _answer(self, w: int, worker: _Worker) -> tuple[str, Any]:
        deadline = time.monotonic() + self.timeout
        try:
            while not worker.conn.poll(0.05):
                if not worker.process.is_alive():
                    raise EOFError
                if time.monotonic() > deadline:
                    self.close()
                    raise WorkerError(
                        f"worker {w} (members {worker.members}) did not answer within {self.timeout} s; "
                        "the pool is closed."
                    )
            return worker.conn.recv()
        except (EOFError, ConnectionError) as err:
            worker.process.join(1.0)
            code = worker.process.exitcode
            self.close()
            raise WorkerError(
                f"worker {w} (members {worker.members}) died (exit code {code}) before answering; the pool "
                "is closed. A negative code is the signal that ended it (e.g. -9: killed, often for memory)."
            ) from err

    def close(self) -> None:
        """Stop the workers (each finishes its batch), and end any that does not stop within 5 s."""
        for worker in self._workers:
            with contextlib.suppress(BrokenPipeError, OSError):  # a worker that has already exited
                worker.conn.send(None)
        for worker in self._workers:
            worker.process.join(5.0)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(1.0)
            worker.conn.close()
        self._workers = []

    def __enter__(self) -> MemberPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------ timing and cost


def _median_seconds(call: Any, repeats: int, warmup: int) -> float:
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        call()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class CostModel:
    """``latency(W) = max over workers w of sum_{k in w} t_k + a + b W``, with the members' compute ``t_k``
    measured alone and ``a``, ``b`` (seconds) fitted to the measured pools.

    Example:
        >>> model = CostModel(member_seconds=[0.01] * 4, a=0.001, b=0.0005)
        >>> round(model.predict(2), 6), model.assignment(2)
        (0.022, [[0, 2], [1, 3]])
    """

    member_seconds: list[float]
    a: float
    b: float

    def assignment(self, workers: int) -> list[list[int]]:
        return assign_members(self.member_seconds, workers)

    def compute(self, workers: int) -> float:
        """The slowest worker's members' compute."""
        return max(sum(self.member_seconds[k] for k in share) for share in self.assignment(workers))

    def predict(self, workers: int) -> float:
        return self.compute(workers) + self.a + self.b * workers

    @classmethod
    def fit(cls, member_seconds: Sequence[float], measured: dict[int, float]) -> CostModel:
        """Least squares of ``measured[W] - compute(W)`` on ``a + b W`` with ``a, b >= 0`` (an overhead neither
        negative nor falling with more workers); from one worker count, ``b = 0``.

        Example:
            >>> model = CostModel.fit([0.01] * 4, {1: 0.042, 2: 0.023})  # residuals 2 ms and 3 ms
            >>> round(model.a, 6), round(model.b, 6)
            (0.001, 0.001)
        """
        base = cls(list(member_seconds), 0.0, 0.0)
        points = [(float(w), s - base.compute(w)) for w, s in sorted(measured.items())]
        mean_w = statistics.fmean(w for w, _ in points)
        mean_r = statistics.fmean(r for _, r in points)
        spread = sum((w - mean_w) ** 2 for w, _ in points)
        b = sum((w - mean_w) * (r - mean_r) for w, r in points) / spread if spread else 0.0
        a = mean_r - b * mean_w
        if b < 0:  # the constrained optimum lies on b = 0
            a, b = mean_r, 0.0
        if a < 0:  # ... or on a = 0
            a, b = 0.0, max(0.0, sum(w * r for w, r in points) / sum(w * w for w, _ in points))
        return cls(list(member_seconds), max(a, 0.0), b)


@dataclass
class MemberTiming:
    """What :func:`time_members` measured (seconds per batch, medians) and the cost model fitted to it."""

    batch_size: int
    member_seconds: list[float]
    sequential: float
    parallel: dict[int, float]
    model: CostModel
    assignments: dict[int, list[list[int]]] = field(default_factory=dict)


def time_members(
    members: Sequence[nn.Module],
    input_shape: Sequence[int],
    workers: Sequence[int] = (1, 2),
    batch_size: int = 256,
    repeats: int = 20,
    warmup: int = 3,
    start_method: str = "spawn",
    threads: int = 1,
) -> MemberTiming:
    """Latency of one batch through every member: sequentially in this process, and by pools of each
    number of ``workers``; medians of ``repeats`` batches after ``warmup`` untimed ones.

    This process computes with ``threads`` intra-op threads too, so that the sequential loop and each
    worker use the same kernels. The pools share the members by their measured cost.

    Raises:
        ValueError: ``batch_size``, ``repeats`` or a worker count out of range.
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(
            f"`batch_size` and `repeats` must be >= 1 and `warmup` >= 0, got {batch_size}, {repeats}, {warmup}."
        )
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for member in members:
            member.eval()
        x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0))
        member_seconds = [_median_seconds(lambda m=m: run_members([m], x), repeats, warmup) for m in members]
        sequential = _median_seconds(lambda: run_members(members, x), repeats, warmup)
        parallel, assignments = {}, {}
        for count in workers:
            with MemberPool(
                members, count, costs=member_seconds, threads=threads, start_method=start_method
            ) as pool:
                parallel[count] = _median_seconds(lambda pool=pool: pool.run(x), repeats, warmup)
                assignments[count] = pool.assignment
    finally:
        torch.set_num_threads(previous)
    model = CostModel.fit(member_seconds, parallel)
    return MemberTiming(batch_size, member_seconds, sequential, parallel, model, assignments)
