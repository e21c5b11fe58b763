"""Progress with an estimate of the time left, for long loops outside a Trainer (specialists, ensembles).

Lightning's own progress bar covers the steps inside one fit; these helpers cover the loop around
many fits (one per specialist, one per ensemble member), where a person wants to know how many are
done and how long the rest will take.

    from kd_lightning.progress import progress

    for g in progress(groups, desc="specialists", unit="specialist"):
        train_one(g)
    # specialists: 2/5 done (40%), 1m03s elapsed, about 1m35s left

On a terminal the line is a live tqdm bar; in a log file (SLURM, CI) one plain line is printed after
each item, so the log shows the estimate without carriage-return noise. Only global rank 0 prints.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

from lightning.pytorch.utilities.rank_zero import rank_zero_only

T = TypeVar("T")


def format_seconds(seconds: float) -> str:
    """``75.2`` -> ``"1m15s"``, ``3725`` -> ``"1h02m"``, ``nan``/``inf`` -> ``"?"``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Count finished items of a known total and estimate the time left from the mean time per item.

    Args:
        total: number of items.
        desc: what is being done, e.g. ``"specialists"``.
        unit: the name of one item, used in the bar.
        stream: where lines go (default ``sys.stderr``).
        bar: ``True`` live tqdm bar, ``False`` one line per item, ``None`` a bar only on a terminal.

    Raises:
        ValueError: ``total`` is negative or not an integer.
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        unit: str = "item",
        stream: IO[str] | None = None,
        bar: bool | None = None,
    ) -> None:
        if not (isinstance(total, int) and total >= 0):
            raise ValueError(f"`total` must be a non-negative integer, got {total!r}.")
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = rank_zero_only.rank == 0
        self.start = time.perf_counter()
        use_bar = self.stream.isatty() if bar is None else bar
        self._bar = None
        if self.enabled and use_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def remaining(self) -> float:
        """Seconds left at the mean pace so far (``nan`` before the first item)."""
        return self._remaining(self.elapsed)

    def _remaining(self, elapsed: float) -> float:
        if self.done == 0:
            return float("nan")
        return elapsed / self.done * max(self.total - self.done, 0)

    def line(self) -> str:
        """E.g. ``"specialists: 2/5 done (40%), 1m03s elapsed, about 1m35s left"``."""
        elapsed = self.elapsed  # one clock reading: elapsed and left must agree
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        return (
            f"{self.desc}: {self.done}/{self.total} done{share}, {format_seconds(elapsed)} elapsed, "
            f"about {format_seconds(self._remaining(elapsed))} left"
        )

    def update(self, n: int = 1, note: str = "") -> None:
        """Mark ``n`` more items done; ``note`` (e.g. the last item's result) is shown with the line."""
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
        else:
            print(self.line() + (f" | {note}" if note else ""), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    items: Iterable[T],
    desc: str = "",
    unit: str = "item",
    total: int | None = None,
    stream: IO[str] | None = None,
    bar: bool | None = None,
) -> Iterator[T]:
    """Iterate over ``items``, reporting after each one how many are done and the time left.

    Args:
        items: what to loop over.
        desc: what is being done.
        unit: the name of one item.
        total: number of items when ``items`` has no ``len``.
        stream: where lines go (default ``sys.stderr``).
        bar: see :class:`Progress`.

    Raises:
        ValueError: ``items`` has no length and ``total`` is not given.
    """
    if total is None:
        if not hasattr(items, "__len__"):
            raise ValueError("`total` is required when `items` has no length (e.g. a generator).")
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, unit, stream, bar) as tracker:
        for item in items:
            yield item
            tracker.update()
