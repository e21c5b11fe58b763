"""What a cached student's training step costs against the student alone and against a hand-written loop.

``scripts/benchmark_cache.py --timing`` prints :func:`cache_timing`'s table. Side by side in one process
(the same torch threads, data, batch size, network, optimizer, schedule and seed), each **round** runs
every variant once, the order rotated from round to round so that no variant always follows another:

* ``student alone``: :class:`~kd_lightning.modules.ClassifierModule` through a Lightning Trainer;
* ``cached, gather_in=main`` and/or ``cached, gather_in=loader``:
  :class:`~kd_lightning.modules.DistillationModule` with :class:`~kd_lightning.callbacks.SoftTargetCache`
  (float16 logits), soft targets gathered in the training process at each batch's start, or where the
  loader makes the batch (:class:`~kd_lightning.cache.StoreFeed`);
* ``hand-written loop``: what one would write in plain PyTorch for the cached student: the inputs, labels
  and the store's soft targets as in-memory tensors (on the device), sliced by a random permutation per
  epoch, the same :class:`~kd_lightning.objectives.HintonKD` loss, AdamW and one-cycle schedule, no
  metrics, no hooks. It measures the framework's own overhead.

Each variant trains ``epochs`` epochs of ``batches`` batches per round (validation off); the first
``warmup_epochs`` of each are dropped (allocator, caches, worker start). A variant's time is the
**median** over every kept epoch of every round; ratios are of medians. For the cached variants the
report also gives the share of an epoch the training process spent on soft targets
(:attr:`SoftTargetCache.gather_seconds`: gathering, moving, filling; in loader mode only what is left
in the training process, which with ``num_workers=0`` still includes the loader's gathers).

The soft targets' values do not change the time of a step, so without ``teacher_ckpt`` the store is
filled from a seeded random network (a one-hidden-layer MLP); the store's format is the shipped config's
(float16 logits, one view).
"""

from __future__ import annotations

import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from kd_lightning.cache import StoreIdentity, fill_store
from kd_lightning.callbacks import SoftTargetCache
from kd_lightning.datamodules import ClassificationSource, FashionMNIST, IndexedDataModule
from kd_lightning.datamodules.loading import cpus_given
from kd_lightning.models import MLP
from kd_lightning.modules import ClassifierModule, DistillationModule, load_teacher
from kd_lightning.objectives import HintonKD
from kd_lightning.optim import OneCycle
from kd_lightning.store import Encoding, SoftTargetStore
from kd_lightning.workflows.timing import synchronize, training_only_trainer

ALONE = "student alone"
HAND = "hand-written loop"
GATHER_PATHS = ("main", "loader")


def cache_name_of(gather_in: str) -> str:
    """The report's name of the cached variant gathering in ``gather_in``."""
    return f"cached, gather_in={gather_in}"


@dataclass(frozen=True)
class TimingSettings:
    """What :func:`cache_timing` runs (defaults: the shipped Fashion-MNIST 800-800 MLP recipe).

    Attributes:
        hidden: the student MLP's hidden widths.
        batch_size: training batch size (every variant).
        val_size: validation samples carved from the training file (the training split is the rest).
        rounds: rounds of every variant, in rotated order.
        epochs: epochs per variant per round.
        warmup_epochs: first epochs of each run left out of the medians.
        batches: training batches per epoch (``None``: the whole training split).
        gather_in: the cached variants: ``["main"]``, ``["loader"]`` or both (before/after).
        teacher_ckpt: the teacher filling the store; ``None``: a seeded random network (see the module).
        threads: torch intra-op threads for every variant (``None``: torch's default), set once.
        num_workers: DataLoader workers of the Lightning variants (``None``: the DataModule's policy,
            0 on a CPU).
        accelerator: Lightning's accelerator (``"auto"``: a GPU when there is one); the hand-written loop
            runs on the same device.
        temperature: HintonKD's temperature.
        hard_weight: HintonKD's hard-label weight.
        lr: AdamW's (peak) learning rate.
        weight_decay: AdamW's weight decay.
        seed: the seed of every variant's initialisation and order.
    """

    hidden: tuple[int, ...] = (800, 800)
    batch_size: int = 128
    val_size: int = 5000
    rounds: int = 5
    epochs: int = 3
    warmup_epochs: int = 1
    batches: int | None = 150
    gather_in: tuple[str, ...] = GATHER_PATHS
    teacher_ckpt: str | None = None
    threads: int | None = None
    num_workers: int | None = None
    accelerator: str = "auto"
    temperature: float = 4.0
    hard_weight: float = 0.5
    lr: float = 1e-3
    weight_decay: float = 5e-4
    seed: int = 1

    def check(self) -> None:
        """Raise a ValueError naming the setting that is out of range."""
        for name in ("batch_size", "rounds", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"`warmup_epochs` must leave an epoch to time: 0 <= warmup_epochs < epochs={self.epochs}, "
                f"got {self.warmup_epochs!r}."
            )
        if self.batches is not None and self.batches < 1:
            raise ValueError(f"`batches` must be a positive integer or None, got {self.batches!r}.")
        unknown = [g for g in self.gather_in if g not in GATHER_PATHS]
        if unknown or not self.gather_in:
            raise ValueError(
                f"`gather_in` must be a non-empty list of {GATHER_PATHS}, got {list(self.gather_in)!r}."
            )


@dataclass
class VariantTiming:
    """One variant's kept epochs: seconds, and (cached variants) the training process's soft-target seconds."""

    name: str
    epoch_seconds: list[float] = field(default_factory=list)
    gather_seconds: list[float] = field(default_factory=list)
    steps_per_epoch: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.epoch_seconds)

    @property
    def step_ms(self) -> float:
        return 1000 * self.median / self.steps_per_epoch

    @property
    def gather_share(self) -> float | None:
        """Median over epochs of the share of the epoch spent on soft targets (``None``: no cache)."""
        if not self.gather_seconds:
            return None
        return statistics.median(g / s for g, s in zip(self.gather_seconds, self.epoch_seconds, strict=True))


@dataclass
class TimingReport:
    """:func:`cache_timing`'s result: each variant's epochs, and how they were measured."""

    variants: dict[str, VariantTiming]
    order: list[list[str]]
    environment: dict[str, Any]
    settings: dict[str, Any]

    def ratio(self, name: str, to: str) -> float:
        return self.variants[name].median / self.variants[to].median

    def table(self) -> str:
        """Markdown: per variant, the median epoch and step, the ratios, the soft-target share."""
        lines = [
            "| variant | epoch (s, median) | step (ms) | / student alone | / hand-written loop | "
            "soft targets, share of a step (training process) | epochs |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, v in self.variants.items():
            share = "" if v.gather_share is None else f"{v.gather_share:.2%}"
            lines.append(
                f"| {name} | {v.median:.3f} | {v.step_ms:.2f} | {self.ratio(name, ALONE):.3f} | "
                f"{self.ratio(name, HAND):.3f} | {share} | {len(v.epoch_seconds)} |"
            )
        return "\n".join(lines)

    def markdown(self) -> str:
        env = "; ".join(f"{k}: {v}" for k, v in self.environment.items())
        s = self.settings
        head = (
            f"{s['rounds']} rounds x {s['epochs']} epochs of {self.variants[ALONE].steps_per_epoch} batches of "
            f"{s['batch_size']} per variant, first {s['warmup_epochs']} of each run dropped; order rotated "
            f"(round 1: {', '.join(self.order[0])})."
        )
        return f"{head}\n{env}\n\n{self.table()}"

    def as_json(self) -> dict[str, Any]:
        return {
            "variants": {
                k: {**asdict(v), "median": v.median, "step_ms": v.step_ms, "gather_share": v.gather_share}
                for k, v in self.variants.items()
            },
            "ratios": {
                k: {"alone": self.ratio(k, ALONE), "hand": self.ratio(k, HAND)} for k in self.variants
            },
            "order": self.order,
            "environment": self.environment,
            "settings": self.settings,
        }


class EpochClock(L.Callback):
    """Wall time of each training epoch, from its start to the end of its last batch (no validation), and
    the epoch's :attr:`SoftTargetCache.gather_seconds` when given the cache."""

    def __init__(self, cache: SoftTargetCache | None = None) -> None:
        self.cache = cache
        self.seconds: list[float] = []
        self.gather_seconds: list[float] = []
        self._start = self._last = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self._start = self._last = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx + 1 == trainer.num_training_batches:  # the epoch's work done on the device too
            synchronize(pl_module.device)
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds.append(self._last - self._start)
        if self.cache is not None:
            self.gather_seconds.append(self.cache.gather_seconds)


def cache_timing(
    workdir: str | Path,
    settings: TimingSettings | None = None,
    source: ClassificationSource | None = None,
    log: Callable[[str], None] | None = print,
) -> TimingReport:
    """Time the student alone, the cached student (per ``gather_in``) and a hand-written loop, interleaved.

    Args:
        workdir: where the store (``<workdir>/store``) and the Trainers' files go.
        settings: what to run (default :class:`TimingSettings`).
        source: the data (default Fashion-MNIST).
        log: where progress lines go (``None``: nowhere).

    Returns:
        the :class:`TimingReport` (``markdown()`` prints the table).

    Raises:
        ValueError: a setting out of range (named).
    """
    settings = TimingSettings() if settings is None else settings
    settings.check()
    source = FashionMNIST() if source is None else source
    say = log if log is not None else (lambda message: None)
    workdir = Path(workdir)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    environment = {
        "torch threads": torch.get_num_threads(),
        "CPUs given": cpus_given(),
        "load average before (1, 5, 15 min)": _load(),
    }
    source.prepare()
    data = _datamodule(source, settings)
    data.setup("fit")
    store = _fill(workdir / "store" / "train", data, source, settings)
    steps = settings.batches or math.ceil(len(data.train_set) / settings.batch_size)
    tensors = _in_memory(data, store, _device(settings))
    runs: dict[str, Callable[[], tuple[list[float], list[float]]]] = {
        ALONE: partial(_lightning, ALONE, None, source, settings, workdir),
        **{
            cache_name_of(g): partial(_lightning, cache_name_of(g), g, source, settings, workdir)
            for g in settings.gather_in
        },
        HAND: partial(_hand_written, tensors, source, settings, steps),
    }
    names = list(runs)
    timings = {name: VariantTiming(name, steps_per_epoch=steps) for name in names}
    order = []
    for r in range(settings.rounds):
        shift = r % len(names)
        this = names[shift:] + names[:shift]
        order.append(this)
        for name in this:
            seconds, gathers = runs[name]()
            kept = slice(settings.warmup_epochs, None)
            timings[name].epoch_seconds += [round(s, 4) for s in seconds[kept]]
            timings[name].gather_seconds += [round(s, 6) for s in gathers[kept]]
            say(f"round {r + 1}/{settings.rounds}, {name}: epochs {', '.join(f'{s:.2f}' for s in seconds)} s")
    environment["load average after (1, 5, 15 min)"] = _load()
    environment["device"] = str(tensors[0].device)
    return TimingReport(timings, order, environment, {**asdict(settings), "data": source.name})


def _datamodule(source: ClassificationSource, settings: TimingSettings) -> IndexedDataModule:
    return IndexedDataModule(
        source, batch_size=settings.batch_size, val_size=settings.val_size, num_workers=settings.num_workers
    )


def _student(settings: TimingSettings) -> Callable[[tuple[int, ...], int], nn.Module]:
    return partial(MLP, hidden=settings.hidden)


def _optimizer(settings: TimingSettings) -> Callable[[Any], torch.optim.Optimizer]:
    return partial(torch.optim.AdamW, lr=settings.lr, weight_decay=settings.weight_decay)


def _fill(
    path: Path, data: IndexedDataModule, source: ClassificationSource, settings: TimingSettings
) -> SoftTargetStore:
    """The store of the training split (float16 logits), filled once."""
    if settings.teacher_ckpt is not None:
        teacher = load_teacher(settings.teacher_ckpt)
    else:
        torch.manual_seed(settings.seed)
        teacher = MLP(tuple(source.input_shape), source.num_classes, hidden=(32,))
    identity = StoreIdentity.of(
        data.train_set,
        data.fingerprint("train"),
        num_classes=source.num_classes,
        encoding=Encoding("logits", "float16"),
    )
    return fill_store(teacher.eval(), data.train_set, path, identity, batch_size=1024, progress=False)


def _lightning(
    name: str, gather_in: str | None, source: ClassificationSource, settings: TimingSettings, workdir: Path
) -> tuple[list[float], list[float]]:
    """One fit of a Lightning variant: its epochs' seconds and soft-target seconds."""
    L.seed_everything(settings.seed, verbose=False)
    shape, classes = tuple(source.input_shape), source.num_classes
    callbacks: list[L.Callback] = []
    cache = None
    if gather_in is None:
        module: L.LightningModule = ClassifierModule(
            _student(settings), classes, shape, optimizer=_optimizer(settings), lr_schedule=OneCycle()
        )
    else:
        module = DistillationModule(
            _student(settings),
            classes,
            shape,
            objective=HintonKD(settings.temperature, settings.hard_weight),
            optimizer=_optimizer(settings),
            lr_schedule=OneCycle(),
        )
        cache = SoftTargetCache(str(workdir / "store"), splits=["train"], rebuild=False, gather_in=gather_in)
        callbacks.append(cache)
    clock = EpochClock(cache)
    trainer = training_only_trainer(
        accelerator=settings.accelerator,
        precision="32-true",
        max_epochs=settings.epochs,
        limit_train_batches=settings.batches,
        callbacks=[*callbacks, clock],
        default_root_dir=workdir / name.replace(" ", "_").replace(",", "").replace("=", "_"),
    )
    with warnings.catch_warnings():
        # The store was filled here from the settings' teacher; the module carries none to check it against.
        warnings.filterwarnings("ignore", message=".*no teacher to check.*")
        trainer.fit(module, _datamodule(source, settings))
    return clock.seconds, clock.gather_seconds


def _device(settings: TimingSettings) -> torch.device:
    """The device Lightning's ``accelerator`` picks (CUDA or the CPU), for the hand-written loop."""
    cuda = settings.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return torch.device("cuda" if cuda else "cpu")


def _in_memory(
    data: IndexedDataModule, store: SoftTargetStore, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """The training split as tensors on ``device``: inputs, labels, the store's soft targets (fp32)."""
    train = data.train_set
    inputs = torch.stack([train.input_of(int(i)) for i in train.indices]).float().contiguous()
    return inputs.to(device), train.targets.to(device), store.lookup(train.indices).to(device)


def _hand_written(
    tensors: tuple[Tensor, Tensor, Tensor], source: ClassificationSource, settings: TimingSettings, steps: int
) -> tuple[list[float], list[float]]:
    """Plain PyTorch: the cached student's training on in-memory tensors; each epoch's seconds (and no
    soft-target seconds: they are in memory)."""
    inputs, targets, soft = tensors
    device = inputs.device
    torch.manual_seed(settings.seed)
    net = _student(settings)(tuple(source.input_shape), source.num_classes).to(device).train()
    optimizer = _optimizer(settings)(net.parameters())
    scheduler = OneCycle().build(optimizer, settings.epochs * steps, steps)["scheduler"]
    objective = HintonKD(settings.temperature, settings.hard_weight)
    n, b = len(inputs), settings.batch_size
    seconds = []
    for epoch in range(settings.epochs):
        order = torch.randperm(n, device=device)
        synchronize(device)
        start = time.perf_counter()
        for step in range(steps):
            rows = order[step * b : (step + 1) * b]
            loss = objective(net(inputs[rows]), soft[rows], targets[rows], epoch=epoch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds, []


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
