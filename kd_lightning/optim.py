"""Learning-rate schedules that know the length of training.

torch's schedulers want their horizon at construction (``OneCycleLR(total_steps=...)``), which a
config file cannot know; these wrappers are built by the module once the Trainer knows it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch.optim import Optimizer


class Schedule(ABC):
    """``schedule.build(optimizer, total_steps, steps_per_epoch)`` returns a Lightning scheduler config."""

    @abstractmethod
    def build(self, optimizer: Optimizer, total_steps: int, steps_per_epoch: int) -> dict[str, Any]: ...


class OneCycle(Schedule):
    """One-cycle policy (Smith 2018), stepped per batch; the peak is the optimizer's ``lr``.

    Args:
        pct_start: fraction of training spent warming up.
        div_factor: initial lr = peak / div_factor.
        final_div_factor: final lr = initial lr / final_div_factor.
    """

    def __init__(
        self, pct_start: float = 0.25, div_factor: float = 25.0, final_div_factor: float = 1e4
    ) -> None:
        if not 0.0 < pct_start < 1.0:
            raise ValueError(f"`pct_start` must lie in (0, 1), got {pct_start}.")
        self.pct_start, self.div_factor, self.final_div_factor = pct_start, div_factor, final_div_factor

    def build(self, optimizer: Optimizer, total_steps: int, steps_per_epoch: int) -> dict[str, Any]:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            # OneCycleLR divides by the warm-up's length (pct_start * total - 1): a run shorter than
            # 1 / pct_start steps (a smoke test) would divide by zero, so such runs stop mid-anneal.
            total_steps=max(total_steps, math.floor(1 / self.pct_start) + 1),
            pct_start=self.pct_start,
            div_factor=self.div_factor,
            final_div_factor=self.final_div_factor,
        )
        return {"scheduler": scheduler, "interval": "step"}


class Cosine(Schedule):
    """Linear warm-up for ``warmup_steps`` batches, then cosine decay to ``min_lr_ratio * lr``."""

    def __init__(self, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> None:
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio

    def build(self, optimizer: Optimizer, total_steps: int, steps_per_epoch: int) -> dict[str, Any]:
        warm, total, floor = self.warmup_steps, max(1, total_steps), self.min_lr_ratio

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            t = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

        return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}


class MultiStep(Schedule):
    """Multiply the lr by ``gamma`` at each epoch in ``milestones`` (the CIFAR KD recipe: 150/180/210)."""

    def __init__(self, milestones: list[int], gamma: float = 0.1) -> None:
        self.milestones, self.gamma = list(milestones), gamma

    def build(self, optimizer: Optimizer, total_steps: int, steps_per_epoch: int) -> dict[str, Any]:
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, self.milestones, self.gamma)
        return {"scheduler": scheduler, "interval": "epoch"}
