"""Checks of a run's launch settings that Lightning lets through or silently adjusts.

- ``precision="16-mixed"`` on CPU: Lightning warns once and runs bf16 autocast instead. bf16 keeps 8
  bits of mantissa where fp16 keeps 11, so this is a different experiment from the one asked for: we
  raise and name ``bf16-mixed``. (``16-true`` does run on CPU with torch >= 2.1, slowly, and is allowed.)
- bf16 on a CUDA device without bf16 support (before Ampere): we raise and name ``16-mixed``.
- more devices than this machine has: for GPUs Lightning raises too, for CPU processes it starts them all
  on too few cores; we raise, naming the count available.
- under SLURM, a task count that disagrees with ``devices x num_nodes``: Lightning takes the world size
  from SLURM (``srun -n1`` with ``devices=2`` trains on one process, without a word) or waits forever for
  ranks that were never started (``kd fit`` run in the batch script without ``srun``); we raise.

Every function is pure (it takes the environment and the machine's capabilities as arguments, with the
current ones as defaults) so the tests can give it any machine. :func:`check_trainer_arguments` runs them
all on a Trainer's arguments; the ``kd`` command calls it before it builds the Trainer, and Python users
can call it before ``L.Trainer(**kwargs)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

PRECISION_ALIASES = {
    "16": "16-mixed",
    "bf16": "bf16-mixed",
    "32": "32-true",
    "64": "64-true",
    "None": "32-true",
}
CPU_PRECISIONS = ("32-true", "64-true", "bf16-mixed", "bf16-true", "16-true")
# SLURM's job names under which Lightning ignores SLURM and expects another launcher (salloc sessions).
SLURM_INTERACTIVE_NAMES = ("bash", "interactive")


def normalise_precision(precision: str | int | None) -> str:
    """Lightning's canonical spelling of ``precision`` (``16`` -> ``"16-mixed"``, ``None`` -> ``"32-true"``)."""
    text = str(precision)
    return PRECISION_ALIASES.get(text, text)


def resolve_accelerator(
    accelerator: str, cuda_available: bool | None = None, mps_available: bool | None = None
) -> str:
    """The device type ``accelerator`` means on this machine: ``"cpu"``, ``"cuda"``, ``"mps"`` or as given."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if mps_available is None:
        mps_available = torch.backends.mps.is_available()
    accelerator = str(accelerator).lower()
    if accelerator == "auto":
        return "cuda" if cuda else "mps" if mps_available else "cpu"
    if accelerator == "gpu":
        return "mps" if mps_available and not cuda else "cuda"
    return accelerator


def check_precision(precision: str | int | None, accelerator: str, bf16_supported: bool | None = None) -> str:
    """Raise unless ``accelerator`` (a resolved device type) runs ``precision`` as asked; return its canonical name.

    Args:
        precision: the Trainer's ``precision`` argument.
        accelerator: ``"cpu"``, ``"cuda"``, ... (see :func:`resolve_accelerator`).
        bf16_supported: whether the CUDA device has bf16; default ``torch.cuda.is_bf16_supported()``.

    Raises:
        ValueError: the combination cannot run as asked; the message names ``trainer.precision``, the
            accelerator, what it can do and what was given.
    """
    name = normalise_precision(precision)
    if accelerator == "cpu" and name == "16-mixed":
        raise ValueError(
            f"`trainer.precision`: {precision!r} cannot run on accelerator 'cpu': CPU autocast has no fp16 "
            "path and Lightning would silently train in bf16 instead. Expected one of "
            f"{list(CPU_PRECISIONS)} (bf16-mixed is the CPU's mixed precision), got {precision!r}."
        )
    if accelerator == "cuda" and name.startswith("bf16"):
        supported = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
        if not supported:
            raise ValueError(
                f"`trainer.precision`: {precision!r} needs a GPU with bfloat16 (compute capability >= 8.0), "
                "and this one has none. Expected '16-mixed' (fp16 with loss scaling) or '32-true', "
                f"got {precision!r}."
            )
    return name


def count_devices(devices: Any, accelerator: str, available: int) -> int:
    """How many processes per node ``devices`` asks for (``"auto"``, ``-1``, ``2``, ``"0,1"``, ``[0, 1]``).

    Raises:
        ValueError: ``devices`` is not one of Lightning's forms; the message names ``trainer.devices``.
    """
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if text == "auto":
        return 1 if accelerator == "cpu" else max(available, 1)
    if text.lstrip("-").isdigit():
        value = int(text)
        if value == -1:
            return available
        if value >= 0 and not (accelerator == "cpu" and value == 0):
            return value
    elif "," in text:
        return len([d for d in text.split(",") if d.strip()])
    raise ValueError(
        "`trainer.devices`: expected a positive integer, -1, 'auto', a list of device ids or a string such as "
        f"'0,1', got {devices!r}."
    )


def available_devices(accelerator: str) -> int:
    """Devices of type ``accelerator`` this process may use: GPUs it sees, or CPU cores it may run on."""
    if accelerator == "cuda":
        return torch.cuda.device_count()
    if accelerator == "cpu":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 1


def check_devices(devices: Any, accelerator: str, available: int, external_launcher: bool = False) -> int:
    """Raise if ``devices`` asks for more than ``available``; return the number of processes per node.

    Args:
        devices: the Trainer's ``devices`` argument.
        accelerator: resolved device type.
        available: devices of that type on this machine (:func:`available_devices`).
        external_launcher: processes are started by SLURM or torchrun, one per task: CPU cores are then
            the launcher's business (a task may see only its own share), GPUs still count.

    Raises:
        ValueError: naming ``trainer.devices``, the count available and the count given.
    """
    n = count_devices(devices, accelerator, available)
    if accelerator == "cpu" and external_launcher:
        return n
    if n > available:
        what = "CPU cores this process may use" if accelerator == "cpu" else f"{accelerator} devices visible"
        raise ValueError(
            f"`trainer.devices`: {devices!r} asks for {n} {accelerator} processes per node, but this machine "
            f"has {available} {what}. Expected at most {available}, got {n}."
        )
    return n


def slurm_launched(environ: Mapping[str, str]) -> bool:
    """Whether Lightning will take its ranks from SLURM (as ``SLURMEnvironment.detect()`` decides)."""
    return "SLURM_NTASKS" in environ and environ.get("SLURM_JOB_NAME") not in SLURM_INTERACTIVE_NAMES


def torchrun_launched(environ: Mapping[str, str]) -> bool:
    """Whether the process was started by torchrun (torch.distributed.elastic sets these)."""
    return all(k in environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"))


def check_slurm_tasks(devices: int, num_nodes: int, environ: Mapping[str, str]) -> None:
    """Under SLURM, raise unless the job's task count is ``devices x num_nodes`` and ``srun`` started us.

    Args:
        devices: processes per node the Trainer expects (:func:`count_devices`).
        num_nodes: the Trainer's ``num_nodes``.
        environ: the process environment (``os.environ``).

    Raises:
        ValueError: naming ``trainer.devices``/``trainer.num_nodes``, the SLURM task count and the fix.
    """
    if not slurm_launched(environ):
        return
    ntasks = int(environ["SLURM_NTASKS"])
    expected = devices * num_nodes
    if ntasks != expected:
        raise ValueError(
            f"`trainer.devices` x `trainer.num_nodes` = {devices} x {num_nodes} = {expected} processes, but the "
            f"SLURM job has {ntasks} task(s) (SLURM_NTASKS={ntasks}): Lightning would train with world size "
            f"{ntasks} without a word. Expected SLURM_NTASKS={expected}: submit with --nodes={num_nodes} "
            f"--ntasks-per-node={devices}, or set devices/num_nodes to match the allocation."
        )
    if ntasks > 1 and "SLURM_STEP_ID" not in environ:
        raise ValueError(
            f"the SLURM job has {ntasks} tasks but this process is the batch script itself, not one of them "
            "(no SLURM_STEP_ID): rank 0 would wait forever for the others. Start the command with `srun`."
        )


def check_trainer_arguments(
    trainer: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    available: int | None = None,
    bf16_supported: bool | None = None,
) -> None:
    """Run every check on a Trainer's keyword arguments (as given, before Lightning adjusts them).

    Args:
        trainer: ``accelerator``, ``devices``, ``num_nodes``, ``precision`` (missing keys take the
            Trainer's defaults); an accelerator given as an object is not checked.
        environ: the process environment; default ``os.environ``.
        available: devices of the resolved type; default :func:`available_devices`.
        bf16_supported: see :func:`check_precision`.

    Raises:
        ValueError: from :func:`check_precision`, :func:`check_devices` or :func:`check_slurm_tasks`.
    """
    environ = os.environ if environ is None else environ
    accelerator = trainer.get("accelerator") or "auto"
    if not isinstance(accelerator, str):
        return
    accelerator = resolve_accelerator(accelerator)
    check_precision(trainer.get("precision"), accelerator, bf16_supported)
    if available is None:
        available = available_devices(accelerator)
    external = slurm_launched(environ) or torchrun_launched(environ)
    devices = check_devices(trainer.get("devices", "auto"), accelerator, available, external)
    num_nodes = int(trainer.get("num_nodes") or 1)
    if num_nodes < 1:
        raise ValueError(f"`trainer.num_nodes`: expected an integer >= 1, got {trainer.get('num_nodes')!r}.")
    check_slurm_tasks(devices, num_nodes, environ)
