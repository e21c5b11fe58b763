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

Inside one fit, :class:`PlainProgress` is a Lightning progress bar made of the same lines (per epoch, and
every N steps of a long epoch); ``kd`` uses it instead of Lightning's bar when standard output is not a
terminal (:func:`wants_plain_progress`). See docs/logging.md.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import IO, Any, TypeVar

import lightning as L
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from typing_extensions import override

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
        initial: items already done before this tracker started (a resumed run): counted as done, left
            out of the pace, so the estimate reflects this start's speed only.

    Raises:
        ValueError: ``total`` is negative or not an integer, or ``initial`` is not in ``[0, total]``.
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        unit: str = "item",
        stream: IO[str] | None = None,
        bar: bool | None = None,
        initial: int = 0,
    ) -> None:
        if not (isinstance(total, int) and total >= 0):
            raise ValueError(f"`total` must be a non-negative integer, got {total!r}.")
        if not (isinstance(initial, int) and 0 <= initial <= total):
            raise ValueError(f"`initial` must be an integer in [0, total={total}], got {initial!r}.")
        self.total, self.desc, self.unit = total, desc, unit
        self.initial = self.done = initial
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = rank_zero_only.rank == 0
        self.start = time.perf_counter()
        use_bar = self.stream.isatty() if bar is None else bar
        self._bar = None
        if self.enabled and use_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True
            )

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def remaining(self) -> float:
        """Seconds left at the mean pace so far (``nan`` before the first item)."""
        return self._remaining(self.elapsed)

    def _remaining(self, elapsed: float) -> float:
        if self.done <= self.initial:
            return float("nan")
        return elapsed / (self.done - self.initial) * max(self.total - self.done, 0)

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


# ---------------------------------------------------------------------------------------------------------
# Inside a fit: plain lines instead of a redrawn bar


#: Metrics shown on every epoch line when logged (and any metric a module logs with ``prog_bar=True``).
EPOCH_METRICS = ("train/loss", "val/loss", "val/acc")
#: Step lines come every 10% of an epoch, but never more often than every this many steps.
MIN_STEPS_BETWEEN_LINES = 100


def default_step_interval(batches_per_epoch: float) -> int:
    """Steps between two step lines when ``every_n_steps`` is not given: 10% of the epoch, at least
    :data:`MIN_STEPS_BETWEEN_LINES`, so an epoch has at most 9 step lines and a short one none.

    Example:
        >>> default_step_interval(430), default_step_interval(5000), default_step_interval(float("inf"))
        (100, 500, 100)
    """
    if not math.isfinite(batches_per_epoch):
        return MIN_STEPS_BETWEEN_LINES
    return max(math.ceil(batches_per_epoch / 10), MIN_STEPS_BETWEEN_LINES)


def format_metric(name: str, value: float) -> str:
    """``"val/acc 0.8712"``; small or large numbers (a learning rate) in scientific notation.

    Example:
        >>> format_metric("val/acc", 0.87123), format_metric("lr", 0.0021), format_metric("n", 12345.0)
        ('val/acc 0.8712', 'lr 2.10e-03', 'n 1.23e+04')
    """
    if value != 0 and math.isfinite(value) and not (1e-2 <= abs(value) < 1e4):
        return f"{name} {value:.2e}"
    return f"{name} {value:.4f}"


class PlainProgress(ProgressBar):
    """Lightning's progress as plain lines, for logs (SLURM, CI, ``kd fit ... > log.txt``).

    Lightning's bar redraws itself with carriage returns (hundreds of updates per epoch in a file); this
    bar prints whole lines only, on global rank 0, built by :class:`Progress` (the same lines as the loops
    around many fits):

    - when training starts, what it will do:
      ``fit: epochs 0-19, 430 steps each; step lines every 100 steps``;
    - every ``every_n_steps`` training steps within an epoch (not at its last step), the epoch so far and
      the step's loss and learning rate:
      ``epoch 0: 100/430 done (23%), 2s elapsed, about 7s left | step 100 | loss 0.9123 | lr 1.2e-04``;
    - after every epoch, the run so far and the epoch's metrics (:data:`EPOCH_METRICS`, validation only
      when it ran in that epoch, and any ``prog_bar`` metric), the learning rate and the epoch's seconds:
      ``epochs: 1/20 done (5%), 9s elapsed, about 2m51s left | epoch 0 | step 430 | train/loss 0.4123 |
      val/loss 0.3921 | val/acc 0.8712 | lr 2.10e-03 | 9.0s``;
    - after a validation in the middle of an epoch (``val_check_interval`` < 1), its metrics.

    ``kd`` uses it instead of Lightning's bar when standard output is not a terminal (see
    :func:`wants_plain_progress`); give it in ``trainer.callbacks`` to have it on a terminal too.

    Args:
        every_n_steps: training steps between two step lines; ``None``: :func:`default_step_interval`
            (10% of the epoch, at least 100 steps); ``0``: no step lines.
        metrics: the metrics of the epoch line, when logged.
        stream: where lines go (default: standard output at the time of each line, where Lightning's bar goes).

    Raises:
        ValueError: ``every_n_steps`` is negative or not an integer.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        metrics: Sequence[str] = EPOCH_METRICS,
        stream: IO[str] | None = None,
    ) -> None:
        super().__init__()
        if every_n_steps is not None and not (
            isinstance(every_n_steps, int) and not isinstance(every_n_steps, bool) and every_n_steps >= 0
        ):
            raise ValueError(
                f"`every_n_steps` must be a non-negative integer or None, got {every_n_steps!r}."
            )
        self.every_n_steps = every_n_steps
        self.metrics = tuple(metrics)
        self.stream = stream
        self._enabled = True
        self._epochs: Progress | None = None
        self._batches: Progress | None = None
        self._pending: tuple[int, float, bool] | None = None  # finished epoch, its seconds, validated
        self._epoch_start = 0.0
        self._seen = 0  # training batches of the current epoch done
        self._validated = False

    # -- ProgressBar's interface ----------------------------------------------------------------------

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    @override
    def print(self, *args: Any, **kwargs: Any) -> None:
        print(*args, **{"file": self._stream(), "flush": True, **kwargs})

    # -- Hooks ----------------------------------------------------------------------------------------

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled:
            return
        first, planned = trainer.current_epoch, self._planned_epochs(trainer)
        self._epochs = Progress(
            planned, "epochs", "epoch", self._stream(), bar=False, initial=min(first, planned)
        )
        steps = self.total_train_batches
        per_epoch = f"{steps} steps each" if math.isfinite(steps) else "steps per epoch unknown"
        interval = self._interval()
        lines = f"step lines every {interval} steps" if interval else "no step lines"
        self.print(f"fit: epochs {first}-{max(planned - 1, first)}, {per_epoch}; {lines}")

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The previous epoch's line: its training metrics are logged by the module's own
        # `on_train_epoch_end`, which Lightning calls after this callback's.
        self._flush(trainer)
        self._epoch_start = time.perf_counter()
        self._validated = False
        self._batches = None
        self._seen = 0

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._batches is None and self._enabled:
            # At the epoch's first batch: a fit resumed in the middle of an epoch starts at its batch.
            steps = self.total_train_batches
            total = int(steps) if math.isfinite(steps) else max(batch_idx, 0)
            self._batches = Progress(
                total,
                f"epoch {trainer.current_epoch}",
                "step",
                self._stream(),
                bar=False,
                initial=min(batch_idx, total),
            )
            if not self._epoch_start:  # resumed mid-epoch: Lightning calls no epoch-start hook
                self._epoch_start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        interval, tracker = self._interval(), self._batches
        done = self._seen = batch_idx + 1
        if not self._enabled or tracker is None or not interval or done % interval or done >= tracker.total:
            return
        notes = [f"step {trainer.global_step}"]
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor) and loss.numel() == 1:
            notes.append(format_metric("loss", float(loss.detach())))
        notes += self._learning_rate(trainer)
        tracker.update(done - tracker.done, " | ".join(notes))

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._validated = True
        tracker = self._batches
        # In the middle of an epoch (val_check_interval < 1): a line of its own.
        if self._enabled and tracker is not None and self._seen < tracker.total:
            values = self._values(trainer, validated=True, train=False)
            self.print(" | ".join([f"validation at step {trainer.global_step}", *values]))

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending = (trainer.current_epoch, time.perf_counter() - self._epoch_start, self._validated)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._flush(trainer)  # an epoch that finished before the stop (e.g. SIGTERM at its end)

    # -- Helpers --------------------------------------------------------------------------------------

    def _stream(self) -> IO[str]:
        return self.stream if self.stream is not None else sys.stdout

    def _interval(self) -> int:
        if self.every_n_steps is not None:
            return self.every_n_steps
        return default_step_interval(self.total_train_batches)

    def _planned_epochs(self, trainer: L.Trainer) -> int:
        """Epochs the fit will run: ``max_epochs``, or fewer when ``max_steps`` ends it first."""
        epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        steps = self.total_train_batches
        if trainer.max_steps > 0 and math.isfinite(steps) and steps > 0:
            by_steps = math.ceil(trainer.max_steps * trainer.accumulate_grad_batches / steps)
            epochs = by_steps if epochs is None else min(epochs, by_steps)
        # Neither limit (training until stopped): the estimate counts the epochs started so far.
        return max(epochs if epochs is not None else trainer.current_epoch + 1, trainer.current_epoch)

    def _flush(self, trainer: L.Trainer) -> None:
        if self._pending is None:
            return
        epoch, seconds, validated = self._pending
        self._pending = None
        if not self._enabled or self._epochs is None:
            return
        notes = [f"epoch {epoch}", f"step {trainer.global_step}"]
        notes += self._values(trainer, validated=validated, train=True)
        notes += [*self._learning_rate(trainer), f"{seconds:.1f}s"]
        tracker = self._epochs
        tracker.total = max(tracker.total, epoch + 1)  # an unbounded fit's estimate grows with it
        tracker.update(epoch + 1 - tracker.done, " | ".join(notes))

    def _values(self, trainer: L.Trainer, validated: bool, train: bool) -> list[str]:
        """``name value`` for the epoch line's metrics, then the ``prog_bar`` ones, as logged last."""
        logged = trainer.callback_metrics
        names = [*self.metrics, *(k for k in trainer.progress_bar_metrics if k not in self.metrics)]
        out = []
        for name in names:
            stage = name.split("/", 1)[0]
            if name not in logged or (stage == "val" and not validated) or (stage == "train" and not train):
                continue
            value = logged[name]
            if isinstance(value, Tensor) and value.numel() == 1:
                out.append(format_metric(name, float(value)))
        return out

    @staticmethod
    def _learning_rate(trainer: L.Trainer) -> list[str]:
        """The first optimizer's learning rate (its first parameter group), or nothing."""
        if not trainer.optimizers:
            return []
        return [format_metric("lr", float(trainer.optimizers[0].param_groups[0]["lr"]))]


def wants_plain_progress(trainer_config: Mapping[str, Any], stream: IO[str] | None = None) -> bool:
    """Whether ``kd`` should add a :class:`PlainProgress` to a Trainer built from ``trainer_config``: the
    progress bar is on (``enable_progress_bar`` true or unset), no progress bar is among its ``callbacks``
    (a user's choice wins), and ``stream`` (default: standard output, where Lightning's bar goes) is not a
    terminal.

    Example:
        >>> import io
        >>> wants_plain_progress({"callbacks": None}, io.StringIO()), wants_plain_progress({"enable_progress_bar": False}, io.StringIO())
        (True, False)
    """
    if trainer_config.get("enable_progress_bar") is False:
        return False
    callbacks = trainer_config.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, Sequence) else [callbacks]
    if any(isinstance(c, ProgressBar) for c in callbacks):
        return False
    stream = stream if stream is not None else sys.stdout
    return not stream.isatty()
