"""Distillation methods: each is a thin, configurable wrapper over a pure loss in :mod:`kd_lightning.losses`.

A method is chosen in YAML by ``class_path`` (``kd_lightning.objectives.HintonKD`` ...), never by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch.nn.functional as F
from torch import Tensor

from kd_lightning.losses import (
    check_temperature,
    check_weight,
    distillation_loss,
    dkd_loss,
    logit_matching_loss,
)


class Objective(ABC):
    """``objective(student_logits, teacher_logits, target, epoch) -> {"loss": ..., <components>}``."""

    #: Temperature of the soft term, logged beside the loss (``None`` where it has none).
    temperature: float | None = None

    @abstractmethod
    def __call__(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, epoch: int = 0
    ) -> dict[str, Tensor]: ...


class HintonKD(Objective):
    """Soft targets at temperature ``T`` (times ``T**2``) plus a weighted hard-label term.

    Args:
        temperature: ``T > 0``.
        hard_weight: weight of the hard-label cross-entropy, in ``[0, 1]``; the soft term gets
            ``1 - hard_weight``. The paper found a "considerably lower" hard weight best.
        soft_loss: ``"kl"`` (zero when the student matches) or ``"ce"`` (the paper's cross-entropy).
    """

    def __init__(self, temperature: float = 4.0, hard_weight: float = 0.1, soft_loss: str = "kl") -> None:
        check_temperature(temperature)
        check_weight(hard_weight)
        self.temperature = temperature
        self.hard_weight = hard_weight
        self.soft_loss = soft_loss

    def __call__(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, epoch: int = 0
    ) -> dict[str, Tensor]:
        return distillation_loss(
            student_logits, teacher_logits, target, self.temperature, self.hard_weight, self.soft_loss
        )


class LogitMatching(Objective):
    """Squared error on (centred) logits, the high-temperature limit, plus a weighted hard-label term."""

    def __init__(self, hard_weight: float = 0.0, center: bool = True) -> None:
        check_weight(hard_weight)
        self.hard_weight = hard_weight
        self.center = center

    def __call__(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, epoch: int = 0
    ) -> dict[str, Tensor]:
        soft = logit_matching_loss(student_logits, teacher_logits, self.center)
        hard = F.cross_entropy(student_logits.float(), target)
        return {"loss": self.hard_weight * hard + (1 - self.hard_weight) * soft, "hard": hard, "soft": soft}


class DKD(Objective):
    """Decoupled KD (Zhao et al. 2022): ``ce_weight * CE + w(epoch) * (alpha * TCKD + beta * NCKD)``.

    Args:
        alpha: target-class term weight.
        beta: non-target term weight (CIFAR-100 default 8).
        temperature: ``T > 0``.
        ce_weight: weight of the hard-label cross-entropy (the paper keeps it at 1).
        warmup_epochs: the KD terms ramp linearly from 0 to full weight over these epochs.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        ce_weight: float = 1.0,
        warmup_epochs: int = 20,
    ) -> None:
        check_temperature(temperature)
        if alpha < 0 or beta < 0 or ce_weight < 0:
            raise ValueError(
                f"DKD weights must be >= 0, got alpha={alpha}, beta={beta}, ce_weight={ce_weight}."
            )
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.ce_weight, self.warmup_epochs = ce_weight, warmup_epochs

    def __call__(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, epoch: int = 0
    ) -> dict[str, Tensor]:
        parts = dkd_loss(student_logits, teacher_logits, target, self.alpha, self.beta, self.temperature)
        ramp = min(1.0, (epoch + 1) / self.warmup_epochs) if self.warmup_epochs > 0 else 1.0
        hard = F.cross_entropy(student_logits.float(), target)
        soft = parts["loss"]
        return {
            "loss": self.ce_weight * hard + ramp * soft,
            "hard": hard,
            "soft": soft,
            "tckd": parts["tckd"],
            "nckd": parts["nckd"],
        }
