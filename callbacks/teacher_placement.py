"""TeacherPlacement: the frozen teacher on the student's device, cheap and out of everything that trains.

A distillation run holds two networks, but only the student trains. The teacher needs its forward pass
and nothing else: no gradients, no optimizer state, no DDP gradient buckets or buffer broadcasts, no room
in checkpoints (it is reloaded from ``teacher_ckpt``). Half precision halves its memory (weights and
activations) at a cost in logits that the soft targets at ``T > 1`` barely notice; channels_last and
``torch.compile`` make its convolutions faster on GPUs.
"""

from __future__ import annotations

from collections.abc import Collection
from contextlib import nullcontext
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from kd_lightning.cache.protocols import TeacherCarrier

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@runtime_checkable
class DDPIgnoring(Protocol):
    """A module already told which parameters and buffers DDP leaves alone.

    ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`` records the names in this
    attribute, and DDP reads them from it when it wraps the module.
    """

    _ddp_params_and_buffers_to_ignore: Collection[str]


class PlacedTeacher(nn.Module):
    """The teacher as the callback runs it: input cast to its dtype and memory format, fp32 logits out.

    With a ``dtype`` the teacher runs with autocast off, wholly in that dtype (under ``16-mixed``
    autocast would otherwise convert its bf16 weights to fp16 at every layer). Without one it runs as
    the Trainer's precision says. The logits are always returned in fp32: the distillation losses
    divide them by ``T`` and subtract nearly equal log-probabilities.

    Args:
        module: the teacher (already frozen and converted by :class:`TeacherPlacement`).
        dtype: the teacher's floating dtype, or ``None`` to leave precision to the Trainer.
        channels_last: pass 4-d inputs in channels_last memory format.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype | None, channels_last: bool) -> None:
        super().__init__()
        self.module = module
        self.dtype = dtype
        self.channels_last = channels_last
        self.train(False)

    def forward(self, x: Tensor) -> Tensor:
        if self.dtype is not None and x.is_floating_point():
            x = x.to(self.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        context = torch.autocast(x.device.type, enabled=False) if self.dtype is not None else nullcontext()
        with context:
            out = self.module(x)
        return out.float()

    def train(self, mode: bool = True) -> PlacedTeacher:
        # A frozen teacher is in eval mode (dropout off, BatchNorm statistics fixed) whatever is asked.
        return super().train(False)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, channels_last={self.channels_last}"


class TeacherPlacement(L.Callback):
    """Place a DistillationModule's frozen teacher for cheap inference beside the student.

    On ``setup`` (before the Trainer moves the module and wraps it in DDP) the callback puts the
    teacher in eval mode with ``requires_grad=False``, optionally casts it to ``dtype`` and to
    channels_last and compiles it, wraps it in a :class:`PlacedTeacher`, and registers every teacher
    parameter and buffer with DDP's ignore list: DDP then neither broadcasts the teacher at start nor
    its BatchNorm buffers at every step, and builds no gradient buckets for it. Each rank keeps its own
    replica (all loaded from the same checkpoint); nothing of the teacher is ever gathered. At the start
    of each loop the teacher is moved to the student's device. The teacher stays out of the optimizer
    (the module builds it over the student only) and out of checkpoints (the module strips
    ``teacher.*``). At ``teardown`` the wrapper is removed again; a cast teacher keeps its dtype.

    A module whose soft targets come from a store (:class:`~kd_lightning.callbacks.SoftTargetCache`, no teacher in
    memory) is left alone. List this callback after a ``SoftTargetCache`` that builds from the
    module's teacher, so that the store's teacher fingerprint is that of the teacher as loaded.

    Args:
        dtype: ``"bfloat16"`` or ``"float16"`` to cast the teacher (half its parameter and activation
            memory), or ``None`` to keep it as loaded (the Trainer's precision applies).
        channels_last: convert the teacher and its 4-d inputs to channels_last (faster convolutions on
            GPUs with tensor cores; no gain on most CPUs).
        compile: ``torch.compile`` the teacher in place (its parameter names do not change).
        compile_kwargs: keyword arguments for ``torch.compile`` (e.g. ``{"mode": "max-autotune"}``).

    Raises:
        ValueError: an unknown ``dtype`` (the message lists the known ones).
        TypeError: the LightningModule has no ``teacher`` attribute (it is not a distillation module).
    """

    def __init__(
        self,
        dtype: str | None = None,
        channels_last: bool = False,
        compile: bool = False,
        compile_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {sorted(DTYPES)} or None, got {dtype!r}.")
        self.dtype = dtype
        self.channels_last = channels_last
        self.compile = compile
        self.compile_kwargs = dict(compile_kwargs or {})

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        teacher = self._teacher(pl_module)
        if teacher is None:
            return
        pl_module.teacher = self._place(teacher)
        self._exclude_from_ddp(pl_module)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._to_device(pl_module)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._to_device(pl_module)

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._to_device(pl_module)

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._to_device(pl_module)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(pl_module, TeacherCarrier) and isinstance(pl_module.teacher, PlacedTeacher):
            pl_module.teacher = pl_module.teacher.module

    def _teacher(self, pl_module: L.LightningModule) -> nn.Module | None:
        if not isinstance(pl_module, TeacherCarrier):
            raise TypeError(
                "TeacherPlacement needs a LightningModule with a `teacher` attribute (a "
                "kd_lightning.cache.TeacherCarrier, e.g. kd_lightning.modules.DistillationModule; on Python "
                "3.12+ a module whose teacher is a submodule declares it by subclassing TeacherCarrier), "
                f"got {type(pl_module).__name__}."
            )
        teacher = pl_module.teacher
        # Placed already by an earlier stage of the same module: place the original again.
        return teacher.module if isinstance(teacher, PlacedTeacher) else teacher

    def _place(self, teacher: nn.Module) -> PlacedTeacher:
        teacher.eval().requires_grad_(False)
        dtype = DTYPES[self.dtype] if self.dtype is not None else None
        if dtype is not None:
            teacher.to(dtype)
        if self.channels_last:
            teacher.to(memory_format=torch.channels_last)
        if self.compile:
            # In place: `torch.compile(teacher)` would rename every parameter `_orig_mod.*`.
            teacher.compile(**self.compile_kwargs)
        params = sum(p.numel() * p.element_size() for p in teacher.parameters())
        rank_zero_info(
            f"TeacherPlacement: teacher frozen in eval mode, {params / 2**20:.1f} MiB of parameters"
            f" ({self.dtype or 'as loaded'}), channels_last={self.channels_last}, compiled={self.compile}."
        )
        return PlacedTeacher(teacher, dtype, self.channels_last)

    @staticmethod
    def _exclude_from_ddp(pl_module: L.LightningModule) -> None:
        # Lightning's DDP wraps the LightningModule itself, so names are relative to it. Earlier entries
        # (another callback's, or the user's) are kept.
        names = {n for n, _ in pl_module.named_parameters() if n.startswith("teacher.")}
        names |= {n for n, _ in pl_module.named_buffers() if n.startswith("teacher.")}
        if isinstance(pl_module, DDPIgnoring):
            names |= set(pl_module._ddp_params_and_buffers_to_ignore)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(pl_module, sorted(names))

    @staticmethod
    def _to_device(pl_module: L.LightningModule) -> None:
        if isinstance(pl_module, TeacherCarrier) and isinstance(pl_module.teacher, nn.Module):
            pl_module.teacher.to(pl_module.device)
