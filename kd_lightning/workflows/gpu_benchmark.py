"""The accelerator benchmark of distillation (``scripts/benchmark_gpu.py``, ``make benchmark-gpu``).

For the CIFAR teacher-student pairs of the literature (resnet32x4 -> resnet8x4, wrn_40_2 -> wrn_16_2) on
CIFAR-shaped data (CIFAR-100 when its files are under ``data_dir``, else random tensors of the same shape),
every variant trains through the product's public path (a Lightning Trainer, ``accelerator`` auto, the
package's modules and callbacks) for ``warmup + steps`` steps, and :class:`StepClock` times the last
``steps``:

* the student alone, in ``32-true`` and ``bf16-mixed``;
* online distillation (:class:`~kd_lightning.modules.DistillationModule` with
  :class:`~kd_lightning.callbacks.TeacherPlacement`): fp32, ``bf16-mixed``, the teacher placed in bf16 +
  channels_last, and that teacher compiled with ``torch.compile`` (a row says why when it cannot be);
* cached distillation (:class:`~kd_lightning.callbacks.SoftTargetCache`: the store is built at fit start,
  the steps read soft targets from it);
* the store's build throughput against plain teacher inference over the same images and batch size.

Training rows report images per second, time per image over the student alone's at the same precision
(for online distillation beside its FLOP limit ``1 + F_teacher / (3 F_student)``: a training step costs
about three forward passes of the student, one of the teacher), peak accelerator memory and the data-loading
wait: the host's time between the end of one step and the start of the next, as a share of the timed
window (on a GPU an upper bound of the device's idle share: the device may still be busy with queued work).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from typing_extensions import override

from kd_lightning.callbacks import SoftTargetCache, TeacherPlacement
from kd_lightning.contracts import Batch
from kd_lightning.costs import forward_flops
from kd_lightning.datamodules import CIFAR100, ClassificationSource, IndexedDataModule, RandomShift
from kd_lightning.datamodules.loading import cpus_given
from kd_lightning.modules import ClassifierModule, DistillationModule
from kd_lightning.resnets import CifarResNet, WideResNet, resnet8x4, resnet32x4, wrn_16_2, wrn_40_2
from kd_lightning.workflows.timing import synchronize, training_only_trainer

NetFactory = Callable[[tuple[int, ...], int], nn.Module]
SHAPE = (3, 32, 32)
NUM_CLASSES = 100

PAIRS: dict[str, tuple[NetFactory, NetFactory]] = {
    "resnet32x4 -> resnet8x4": (resnet32x4, resnet8x4),
    "wrn_40_2 -> wrn_16_2": (wrn_40_2, wrn_16_2),
}
"""Teacher and student of each pair, by the names of :mod:`kd_lightning.resnets`."""

TINY_PAIRS: dict[str, tuple[NetFactory, NetFactory]] = {
    "resnet32x4 -> resnet8x4": (
        partial(CifarResNet, depth=14, widths=(4, 4, 8, 8)),
        partial(CifarResNet, depth=8, widths=(4, 4, 4, 8)),
    ),
    "wrn_40_2 -> wrn_16_2": (
        partial(WideResNet, depth=16, widen_factor=1),
        partial(WideResNet, depth=10, widen_factor=1),
    ),
}
"""The same families at tiny widths and depths (``--tiny``): the table's shape, in seconds on a CPU."""

COLUMNS = (
    "pair",
    "variant",
    "precision",
    "images/s",
    "ratio",
    "ratio of",
    "FLOP limit",
    "peak memory (MiB)",
    "data wait",
)
"""Columns of the printed table."""

TIME_RATIO = "time per image / student alone"
BUILD_RATIO = "throughput / plain teacher inference"


@dataclass(frozen=True)
class BenchmarkSettings:
    """What the benchmark runs.

    Attributes:
        batch_size: training batch size.
        warmup: untimed steps first (allocation, kernel selection, worker start-up).
        steps: timed steps.
        accelerator: Lightning's accelerator name (``auto``: a GPU when there is one).
        data_dir: where CIFAR-100's ``cifar-100-python/`` is looked for.
        compile: try the ``torch.compile`` variant.
        tiny: tiny networks and synthetic data (:data:`TINY_PAIRS`): the table's shape in seconds.
        build_batch_size: teacher batch size of the store build and of plain inference.
    """

    batch_size: int = 256
    warmup: int = 20
    steps: int = 100
    accelerator: str = "auto"
    data_dir: str = "data"
    compile: bool = True
    tiny: bool = False
    build_batch_size: int = 1024

    @classmethod
    def tiny_cpu(cls) -> BenchmarkSettings:
        """The ``--tiny`` configuration: tiny networks, 8-image batches, 1 + 3 steps, on the CPU."""
        return cls(
            batch_size=8, warmup=1, steps=3, accelerator="cpu", compile=False, tiny=True, build_batch_size=16
        )

    def check(self) -> None:
        """Raise a ValueError naming the setting unless every count is positive (``warmup`` may be 0)."""
        for name, value in (
            ("batch_size", self.batch_size),
            ("steps", self.steps),
            ("build_batch_size", self.build_batch_size),
        ):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not (isinstance(self.warmup, int) and self.warmup >= 0):
            raise ValueError(f"`warmup` must be an integer >= 0, got {self.warmup!r}.")


@dataclass
class Row:
    """One line of the table; ``None`` prints as ``n/a`` (or empty where nothing applies)."""

    pair: str
    variant: str
    precision: str
    images_per_s: float | None = None
    ratio: float | None = None
    ratio_of: str = ""
    flop_limit: float | None = None
    peak_mib: float | None = None
    data_wait: float | None = None
    note: str = ""

    def cells(self) -> list[str]:
        """The row's cells in :data:`COLUMNS` order."""
        if self.note:
            return [self.pair, self.variant, self.precision, self.note, "", "", _num(self.flop_limit), "", ""]
        return [
            self.pair,
            self.variant,
            self.precision,
            _num(self.images_per_s, "{:,.0f}"),
            _num(self.ratio),
            self.ratio_of,
            _num(self.flop_limit),
            _num(self.peak_mib, "{:,.0f}", "n/a"),
            _num(self.data_wait, "{:.1%}"),
        ]


def _num(value: float | None, fmt: str = "{:.2f}", missing: str = "") -> str:
    return missing if value is None else fmt.format(value)


@dataclass
class Report:
    """The benchmark's result: the environment it ran in, FLOPs per pair, and the table's rows."""

    environment: dict[str, Any]
    flops: dict[str, dict[str, int]]
    rows: list[Row] = field(default_factory=list)

    def table(self) -> str:
        """The rows as one markdown table."""
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
        lines += ["| " + " | ".join(row.cells()) + " |" for row in self.rows]
        return "\n".join(lines)

    def markdown(self) -> str:
        """What the script prints: the environment, then the table."""
        env = "\n".join(f"- {key}: {value}" for key, value in self.environment.items())
        return f"{env}\n\n{self.table()}\n"

    def as_json(self) -> dict[str, Any]:
        return {"environment": self.environment, "flops": self.flops, "rows": [asdict(r) for r in self.rows]}


def flop_limit(teacher_flops: int, student_flops: int) -> float:
    """``1 + F_teacher / (3 F_student)``: online distillation's step time over the student's, if both
    networks ran at the same FLOP rate (a training step is about three forward passes, the teacher's one).

    Example:
        >>> flop_limit(300, 100)
        2.0
    """
    if teacher_flops < 0 or student_flops <= 0:
        raise ValueError(
            f"FLOPs must be positive, got teacher {teacher_flops!r} and student {student_flops!r}."
        )
    return 1.0 + float(teacher_flops) / (3.0 * float(student_flops))


class RandomImages(ClassificationSource):
    """CIFAR-shaped random data (3x32x32, 100 classes): what timing needs when CIFAR-100 is absent.

    Args:
        samples: training samples (the test split has a tenth, at least one).
        seed: seed of the tensors.
    """

    name = "random_cifar_shaped"
    num_classes = NUM_CLASSES
    input_shape = SHAPE

    def __init__(self, samples: int, seed: int = 0) -> None:
        self.samples = samples
        self.seed = seed
        self.class_names = [str(i) for i in range(NUM_CLASSES)]

    def load(self, train: bool) -> tuple[Dataset, Tensor]:
        n = self.samples if train else max(1, self.samples // 10)
        generator = torch.Generator().manual_seed(self.seed + (0 if train else 1))
        x = torch.randn(n, *SHAPE, generator=generator)
        y = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
        return TensorDataset(x, y), y


class StepClock(L.Callback):
    """Time the training steps ``warmup .. last`` of one epoch: the window from the first timed step's
    start to the last one's end (the device synchronised at both ends), the host's gaps between steps
    in it, and the peak accelerator memory of training (CUDA only).

    Args:
        warmup: untimed steps first.
        last: index of the last timed step (the run's last step).
    """

    def __init__(self, warmup: int, last: int) -> None:
        self.warmup, self.last = warmup, last
        self.start = self.stop = 0.0
        self.images = 0
        self.gaps: list[float] = []
        self.peak_bytes: int | None = None
        self._end: float | None = None

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Batch, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if batch_idx == self.warmup:
            synchronize(pl_module.device)
            self.start = time.perf_counter()
        elif batch_idx > self.warmup and self._end is not None:
            self.gaps.append(now - self._end)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Batch, batch_idx: int
    ) -> None:
        if batch_idx < self.warmup:
            return
        self.images += int(batch["target"].shape[0])
        if batch_idx == self.last:
            synchronize(pl_module.device)
            if pl_module.device.type == "cuda":
                self.peak_bytes = torch.cuda.max_memory_allocated(pl_module.device)
        self._end = time.perf_counter()
        self.stop = self._end

    @property
    def seconds(self) -> float:
        return self.stop - self.start

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def data_wait(self) -> float:
        """The host's gaps between timed steps, as a share of the timed window."""
        return sum(self.gaps) / self.seconds


def cifar_data(settings: BenchmarkSettings) -> tuple[IndexedDataModule, str]:
    """The benchmark's DataModule (CIFAR-100 or :class:`RandomImages`, the CIFAR configs' ``RandomShift``
    augmentation, no validation) and a line saying which data it is.

    ``--tiny`` always uses a few random images; otherwise CIFAR-100 when its files are under
    ``data_dir`` (nothing is downloaded), else as many random images as the steps need.
    """
    needed = settings.batch_size * (settings.warmup + settings.steps)
    source: ClassificationSource = RandomImages(needed)
    described = f"synthetic: {needed:,} random 3x32x32 tensors, {NUM_CLASSES} classes (CIFAR-100's shape)"
    if not settings.tiny:
        cifar = CIFAR100(settings.data_dir, download=False)
        try:
            cifar.prepare()
        except FileNotFoundError as missing:
            described += f" (CIFAR-100 not found: {str(missing).split(';')[0]})"
        else:
            source, described = cifar, f"CIFAR-100 from {settings.data_dir!r}"
    dm = IndexedDataModule(
        source,
        batch_size=settings.batch_size,
        eval_batch_size=settings.build_batch_size,
        val_size=0,
        train_transform=RandomShift(max_shift=4, hflip=True),
    )
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_set is not None
    if len(dm.train_set) // settings.batch_size < settings.warmup + settings.steps:
        raise ValueError(
            f"`steps` + `warmup` = {settings.warmup + settings.steps} batches of {settings.batch_size}, but the "
            f"training split has {len(dm.train_set)} samples: fewer steps or a smaller batch."
        )
    return dm, described


def environment(settings: BenchmarkSettings, data: str) -> dict[str, Any]:
    """Device name, versions, CPUs, data, and what else ran (load averages, running processes)."""
    if settings.accelerator != "cpu" and torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
        memory = (
            "torch.cuda.max_memory_allocated during the timed fit (weights, activations, optimizer state)"
        )
    else:
        device = f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads)"
        memory = "n/a on CPU (no allocator peak is tracked; process peak RSS is given below)"
    return {
        "device": device,
        "versions": f"torch {torch.__version__}, lightning {L.__version__}, Python {platform.python_version()}",
        "CPUs given": cpus_given(),
        "data": data,
        "networks": "tiny stand-ins of each pair's families (TINY_PAIRS: the table's shape, not its figures)"
        if settings.tiny
        else "as named (kd_lightning.resnets), untrained: timing does not depend on the weights",
        "settings": ", ".join(f"{k}={v}" for k, v in asdict(settings).items()),
        "peak memory": memory,
        "data wait": "host time between one step's end and the next step's start, share of the timed window",
        "load average before (1, 5, 15 min)": _load(),
    }


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    running = ""
    loadavg = Path("/proc/loadavg")
    if loadavg.is_file():
        running = f"; runnable/total tasks {loadavg.read_text().split()[3]}"
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}{running}"


def _seeded(factory: NetFactory) -> nn.Module:
    torch.manual_seed(0)
    return factory(SHAPE, NUM_CLASSES)


def _fit(
    module: L.LightningModule,
    dm: IndexedDataModule,
    settings: BenchmarkSettings,
    precision: str,
    callbacks: list[L.Callback],
    workdir: Path,
) -> tuple[StepClock, L.Trainer]:
    last = settings.warmup + settings.steps - 1
    clock = StepClock(settings.warmup, last)
    trainer = training_only_trainer(
        accelerator=settings.accelerator,
        precision=precision,
        max_epochs=1,
        limit_train_batches=last + 1,
        callbacks=[*callbacks, clock],
        default_root_dir=workdir,
    )
    trainer.fit(module, datamodule=dm)
    return clock, trainer


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _plain_inference(
    teacher: nn.Module, dm: IndexedDataModule, device: torch.device, batch_size: int
) -> float:
    """Images per second of what anyone would write to run the teacher over the training images: a
    DataLoader (the DataModule's settings) and ``inference_mode``, fp32."""
    assert dm.train_set is not None
    images = Subset(dm.train_set.source, dm.train_set.indices.tolist())
    loader = DataLoader(images, batch_size=batch_size, **dm.loader_settings.as_kwargs())
    teacher = teacher.to(device).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for x, _ in loader:
            teacher(x.to(device, non_blocking=True))
    synchronize(device)
    return len(images) / (time.perf_counter() - start)


def benchmark_pair(
    pair: str,
    teacher: NetFactory,
    student: NetFactory,
    dm: IndexedDataModule,
    settings: BenchmarkSettings,
    workdir: Path,
    flops: dict[str, int],
) -> list[Row]:
    """Every variant of one teacher-student pair (see the module's description)."""
    optimizer = partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    limit = flop_limit(flops["teacher"], flops["student"])
    rows: list[Row] = []
    alone: dict[str, float] = {}
    device = torch.device("cpu")

    def measured(variant: str, precision: str, clock: StepClock, online: bool) -> Row:
        reference = alone[precision]
        return Row(
            pair,
            variant,
            precision,
            clock.images_per_s,
            reference / clock.images_per_s,
            f"{TIME_RATIO} ({precision})",
            limit if online else None,
            None if clock.peak_bytes is None else clock.peak_bytes / 2**20,
            clock.data_wait,
        )

    for precision in ("32-true", "bf16-mixed"):
        module = ClassifierModule(partial(_seeded_call, student), NUM_CLASSES, SHAPE, optimizer=optimizer)
        clock, trainer = _fit(module, dm, settings, precision, [], workdir)
        device = trainer.strategy.root_device
        alone[precision] = clock.images_per_s
        rows.append(measured("student alone", precision, clock, online=False))
        del module, trainer
        _release(device)

    def distiller() -> DistillationModule:
        return DistillationModule(
            partial(_seeded_call, student), NUM_CLASSES, SHAPE, teacher=_seeded(teacher), optimizer=optimizer
        )

    online = [
        ("online", "32-true", TeacherPlacement()),
        ("online", "bf16-mixed", TeacherPlacement()),
        (
            "online, teacher bf16 + channels_last",
            "bf16-mixed",
            TeacherPlacement("bfloat16", channels_last=True),
        ),
    ]
    for variant, precision, placement in online:
        clock, _ = _fit(distiller(), dm, settings, precision, [placement], workdir)
        rows.append(measured(variant, precision, clock, online=True))
        _release(device)

    compiled = "online, teacher bf16 + channels_last + torch.compile"
    if not settings.compile:
        why = (
            "--tiny run (compiling takes longer than the steps it would time)"
            if settings.tiny
            else "--no-compile"
        )
        rows.append(Row(pair, compiled, "bf16-mixed", flop_limit=limit, note=f"skipped: {why}"))
    else:
        placement = TeacherPlacement("bfloat16", channels_last=True, compile=True)
        try:
            clock, _ = _fit(distiller(), dm, settings, "bf16-mixed", [placement], workdir)
        except Exception as err:  # torch.compile fails in platform-specific ways; the table says how
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            rows.append(
                Row(
                    pair,
                    compiled,
                    "bf16-mixed",
                    flop_limit=limit,
                    note=f"skipped: {type(err).__name__}: {first_line[:120]}",
                )
            )
        else:
            rows.append(measured(compiled, "bf16-mixed", clock, online=True))
        _release(device)

    store = workdir / "stores" / pair.replace(" -> ", "_to_")
    shutil.rmtree(store, ignore_errors=True)
    cache = SoftTargetCache(str(store), splits=["train"], batch_size=settings.build_batch_size)
    clock, _ = _fit(distiller(), dm, settings, "32-true", [cache], workdir)
    rows.append(measured("cached (SoftTargetCache, float16 logits)", "32-true", clock, online=False))
    _release(device)

    stats = cache.build_stats["train"]
    build_per_s = stats["samples"] * stats["views"] / stats["seconds"]
    plain_per_s = _plain_inference(_seeded(teacher), dm, device, settings.build_batch_size)
    rows.append(
        Row(
            pair,
            f"store build ({int(stats['samples']):,} images)",
            "32-true",
            build_per_s,
            build_per_s / plain_per_s,
            f"{BUILD_RATIO} ({plain_per_s:,.0f} images/s)",
        )
    )
    _release(device)
    return rows


def _seeded_call(factory: NetFactory, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    torch.manual_seed(1)
    return factory(input_shape, num_classes)


def run_benchmark(settings: BenchmarkSettings, workdir: str | Path) -> Report:
    """Run every pair's variants (:data:`PAIRS`, or :data:`TINY_PAIRS` with ``settings.tiny``).

    Args:
        settings: what to run.
        workdir: where the Trainers and the soft-target stores write.

    Returns:
        the :class:`Report`: environment, FLOPs per pair (teacher, student; one forward pass of one image)
        and the rows, in the order of :data:`PAIRS`.
    """
    settings.check()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dm, data = cifar_data(settings)
    report = Report(environment(settings, data), flops={})
    for pair, (teacher, student) in (TINY_PAIRS if settings.tiny else PAIRS).items():
        flops = {
            "teacher": forward_flops(_seeded(teacher), SHAPE),
            "student": forward_flops(_seeded(student), SHAPE),
        }
        report.flops[pair] = flops
        report.rows += benchmark_pair(pair, teacher, student, dm, settings, workdir, flops)
    report.environment["load average after (1, 5, 15 min)"] = _load()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    report.environment["process peak RSS"] = f"{peak_rss:,.0f} MiB (the whole run, every variant)"
    return report


def write_report(report: Report, out: str | Path) -> list[Path]:
    """Write ``out`` as markdown (``.md``) or JSON (``.json``), and the other format beside it, atomically.

    Returns:
        the two paths written.
    """
    out = Path(out)
    if out.suffix not in (".md", ".json"):
        raise ValueError(f"`out` must end in .md or .json, got {str(out)!r}.")
    written = []
    for path, text in (
        (out.with_suffix(".md"), report.markdown()),
        (out.with_suffix(".json"), json.dumps(report.as_json(), indent=1)),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
        written.append(path)
    return written


def with_overrides(settings: BenchmarkSettings, **changes: Any) -> BenchmarkSettings:
    """``settings`` with the given fields changed (those given as ``None`` are kept)."""
    return replace(settings, **{k: v for k, v in changes.items() if v is not None})
