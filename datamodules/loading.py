"""How the DataModules load: workers, pinned memory and prefetching that keep an accelerator fed.

One policy, :func:`loader_options`, decides every DataLoader setting a user left unset (``None``):

* on a GPU, the workers follow the CPUs this process was given (:func:`cpus_given`: its CPU affinity,
  capped by SLURM's ``cpus-per-task``), one CPU left to the training process itself, at most
  :data:`MAX_AUTO_WORKERS`; host memory is pinned, workers persist across epochs and each prefetches
  :data:`GPU_PREFETCH` batches;
* on a CPU, loading stays in the training process (``num_workers=0``, nothing pinned): the data of this
  package's sources is in memory, and workers would only compete with the step for the same cores.

A setting the user gave explicitly is kept as given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

#: Most workers the policy starts on its own (more rarely help one GPU and cost memory and start-up).
MAX_AUTO_WORKERS = 16
#: Batches each worker loads ahead on a GPU (PyTorch's default is 2).
GPU_PREFETCH = 4


@dataclass(frozen=True)
class LoaderSettings:
    """DataLoader settings, as :func:`loader_options` resolved them.

    Attributes:
        num_workers: worker processes (0: load in the training process).
        pin_memory: pin batches in page-locked host memory (faster, asynchronous copies to a GPU).
        persistent_workers: keep the workers alive between epochs.
        prefetch_factor: batches each worker loads ahead; ``None`` (PyTorch's default) without workers.
    """

    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: int | None

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``torch.utils.data.DataLoader``."""
        return asdict(self)


def cpus_given(environ: Mapping[str, str] | None = None) -> int:
    """The CPUs this process may use: its CPU affinity, capped by ``SLURM_CPUS_PER_TASK`` when set.

    ``os.sched_getaffinity`` sees the CPUs a job scheduler or ``taskset`` bound the process to; SLURM
    binds them only when its task plug-in is configured to, so its ``cpus-per-task`` caps the count too.

    Args:
        environ: the environment to read (default: ``os.environ``).

    Raises:
        ValueError: ``SLURM_CPUS_PER_TASK`` is set but not a positive integer.

    Example:
        >>> cpus_given({"SLURM_CPUS_PER_TASK": "1"})
        1
    """
    environ = os.environ if environ is None else environ
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    slurm = environ.get("SLURM_CPUS_PER_TASK")
    if slurm is None:
        return max(1, affinity)
    if not slurm.strip().isdigit() or int(slurm) < 1:
        raise ValueError(f"`SLURM_CPUS_PER_TASK` must be a positive integer, got {slurm!r}.")
    return max(1, min(affinity, int(slurm)))


def processes_sharing_cpus(devices: int, environ: Mapping[str, str] | None = None) -> int:
    """How many training processes of this node share the CPUs of :func:`cpus_given`.

    Under SLURM (``SLURM_CPUS_PER_TASK`` set) each process is a task with CPUs of its own: 1. Otherwise
    the Trainer's processes on this node (``devices``) all see the same CPUs.

    Example:
        >>> processes_sharing_cpus(4, {}), processes_sharing_cpus(4, {"SLURM_CPUS_PER_TASK": "8"})
        (4, 1)
    """
    environ = os.environ if environ is None else environ
    return 1 if "SLURM_CPUS_PER_TASK" in environ else max(1, devices)


def loader_options(
    num_workers: int | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = None,
    *,
    gpu: bool,
    cpus: int,
    processes: int = 1,
) -> LoaderSettings:
    """DataLoader settings: the user's where given, the policy of this module elsewhere.

    Args:
        num_workers: the user's worker count, or ``None`` for the policy's: on a GPU
            ``min(cpus // processes - 1, MAX_AUTO_WORKERS)`` (at least 0), on a CPU 0.
        pin_memory: the user's choice, or ``None``: pinned exactly on a GPU.
        persistent_workers: the user's choice, or ``None``: whenever there are workers.
        prefetch_factor: the user's, or ``None``: :data:`GPU_PREFETCH` on a GPU with workers, else
            PyTorch's default.
        gpu: whether the batches go to a GPU (the Trainer's accelerator is CUDA).
        cpus: CPUs given to the job on this node (:func:`cpus_given`).
        processes: training processes sharing those CPUs (devices per node under DDP on one task;
            1 when each process has its own, e.g. one SLURM task per GPU).

    Raises:
        ValueError: a negative or non-integer ``num_workers``, a ``prefetch_factor`` below 1, a
            non-positive ``cpus`` or ``processes``, or ``persistent_workers``/``prefetch_factor`` asked for
            with ``num_workers=0`` (each names the argument). Asked for with automatic workers that come
            out as 0 (a CPU), they are dropped.

    Example:
        >>> loader_options(gpu=False, cpus=8)
        LoaderSettings(num_workers=0, pin_memory=False, persistent_workers=False, prefetch_factor=None)
        >>> loader_options(gpu=True, cpus=8, processes=2)
        LoaderSettings(num_workers=3, pin_memory=True, persistent_workers=True, prefetch_factor=4)
        >>> loader_options(num_workers=2, pin_memory=False, gpu=True, cpus=8).pin_memory
        False
    """
    for name, value in (("cpus", cpus), ("processes", processes)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if num_workers is not None and not (
        isinstance(num_workers, int) and not isinstance(num_workers, bool) and num_workers >= 0
    ):
        raise ValueError(f"`num_workers` must be an integer >= 0 or None (automatic), got {num_workers!r}.")
    if prefetch_factor is not None and not (isinstance(prefetch_factor, int) and prefetch_factor >= 1):
        raise ValueError(f"`prefetch_factor` must be an integer >= 1 or None, got {prefetch_factor!r}.")
    if num_workers == 0 and (persistent_workers or prefetch_factor is not None):
        raise ValueError(
            "`persistent_workers` and `prefetch_factor` apply to worker processes, but `num_workers` is 0 "
            f"(got persistent_workers={persistent_workers!r}, prefetch_factor={prefetch_factor!r}): set "
            "`num_workers` >= 1 or leave them unset."
        )
    if num_workers is None:
        num_workers = max(0, min(cpus // processes - 1, MAX_AUTO_WORKERS)) if gpu else 0
        if num_workers == 0:  # the worker settings have no workers to apply to
            persistent_workers, prefetch_factor = False, None
    if prefetch_factor is None and gpu and num_workers > 0:
        prefetch_factor = GPU_PREFETCH
    return LoaderSettings(
        num_workers=num_workers,
        pin_memory=gpu if pin_memory is None else bool(pin_memory),
        persistent_workers=num_workers > 0 if persistent_workers is None else bool(persistent_workers),
        prefetch_factor=prefetch_factor,
    )
