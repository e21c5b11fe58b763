"""Distillation methods: each is a thin, configurable wrapper over a pure loss in :mod:`kd_lightning.losses`.

A method is chosen in YAML by ``class_path`` (``kd_lightning.objectives.HintonKD`` ...), never by name.

Methods on logits (:class:`HintonKD`, :class:`LogitMatching`, :class:`DKD`) read the student's and the
teacher's logits; methods on intermediate representations (:class:`FitNetsHints`, :class:`AttentionTransfer`)
also name layers of both networks (``layer_pairs``), whose outputs
:class:`~kd_lightning.modules.DistillationModule` captures (:mod:`kd_lightning.features`) and passes as
``features``, after the objective's trainable ``adapters`` (FitNets' regressors), which the module owns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.losses import (
    attention_transfer_loss,
    check_temperature,
    check_weight,
    distillation_loss,
    dkd_loss,
    hint_loss,
    logit_matching_loss,
    match_spatial,
)

FeaturePairs = Sequence[tuple[Tensor, Tensor]]
"""``(student feature after its adapter, teacher feature)`` per layer pair, in the order of ``layer_pairs``."""


class Objective(ABC):
    """``objective(student_logits, teacher_logits, target, epoch, features) -> {"loss": ..., <components>}``."""

    #: Temperature of the soft term, logged beside the loss (``None`` where it has none).
    temperature: float | None = None
    #: ``(student layer, teacher layer)`` module names whose outputs the objective compares (``features``);
    #: empty for objectives on logits only.
    layer_pairs: tuple[tuple[str, str], ...] = ()

    def adapters(
        self, student_shapes: Sequence[tuple[int, ...]], teacher_shapes: Sequence[tuple[int, ...]]
    ) -> list[nn.Module]:
        """One trainable module per layer pair, applied to the student's feature before the objective sees
        it (FitNets' regressor), given the features' shapes without the batch axis. They belong to the student:
        its optimizer and checkpoint. Default: identities (no parameters)."""
        return [nn.Identity() for _ in student_shapes]

    @abstractmethod
    def __call__(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        epoch: int = 0,
        features: FeaturePairs = (),
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
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        epoch: int = 0,
        features: FeaturePairs = (),
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
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        epoch: int = 0,
        features: FeaturePairs = (),
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
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        epoch: int = 0,
        features: FeaturePairs = (),
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


def _layer_pairs(student_layers: Sequence[str], teacher_layers: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Pair the layer names; one list each, of equal non-zero length (a single string is one layer)."""
    student = [student_layers] if isinstance(student_layers, str) else list(student_layers)
    teacher = [teacher_layers] if isinstance(teacher_layers, str) else list(teacher_layers)
    if not student or len(student) != len(teacher):
        raise ValueError(
            "`student_layers` and `teacher_layers` must name the same number of layers (at least one), got "
            f"{student} and {teacher}."
        )
    return tuple(zip(student, teacher, strict=True))


class FeatureObjective(Objective):
    """What the objectives on intermediate representations share: the layer pairs, and Hinton's
    soft-target term on the logits (``temperature``, ``hard_weight``, ``soft_loss`` as in :class:`HintonKD`)
    beside the feature term."""

    def __init__(
        self,
        student_layers: Sequence[str],
        teacher_layers: Sequence[str],
        temperature: float,
        hard_weight: float,
        soft_loss: str,
    ) -> None:
        self.layer_pairs = _layer_pairs(student_layers, teacher_layers)
        self.logits = HintonKD(temperature, hard_weight, soft_loss)
        self.temperature = temperature

    #: Name of the feature term among the returned components (``train/<component>`` in the logs).
    component: str = "feature"

    @abstractmethod
    def feature_loss(self, pairs: FeaturePairs) -> Tensor:
        """The feature term over the layer pairs (a scalar fp32 tensor)."""

    def weights(self, epoch: int) -> tuple[float, float]:
        """The weights of the logit term and of the feature term at ``epoch``. Default: both 1."""
        return 1.0, 1.0

    def __call__(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        epoch: int = 0,
        features: FeaturePairs = (),
    ) -> dict[str, Tensor]:
        if len(features) != len(self.layer_pairs):
            raise ValueError(
                f"{type(self).__name__} compares {len(self.layer_pairs)} layer pairs {list(self.layer_pairs)} but "
                f"was given {len(features)} feature pairs; DistillationModule captures them."
            )
        feature = self.feature_loss(features)
        parts = self.logits(student_logits, teacher_logits, target)
        # A weight of 0 keeps its term in the graph: every parameter takes part in every loss (DDP needs it).
        logit_weight, feature_weight = self.weights(epoch)
        loss = logit_weight * parts["loss"] + feature_weight * feature
        return {"loss": loss, "hard": parts["hard"], "soft": parts["soft"], self.component: feature}


class FitNetsHints(FeatureObjective):
    """FitNets (Romero et al. 2015): the student's guided layer, through a learned regressor, matches the
    teacher's hint layer (:func:`~kd_lightning.losses.hint_loss`), plus Hinton's soft targets.

    The regressor of each pair is a 1x1 convolution and BatchNorm from the student's channels to the
    teacher's (a linear layer for flat features); the module owns it, so it trains with the student and is
    saved in its checkpoint, never the teacher's. Maps of different sizes are pooled to the smaller.

    Two schedules:

    * the paper's two stages: ``feature_only_epochs=E, keep_hint=False``: the first ``E`` epochs train on
      the hint alone, then soft targets alone (plus the hard labels);
    * a joint loss (RepDistiller's): ``feature_only_epochs=0, keep_hint=True``: soft targets plus
      ``hint_weight`` times the hint at every step.

    Every term is computed at every step and weighted by 0 when off (:meth:`weights`), so every parameter
    takes part in each loss (DDP requires it).

    Args:
        student_layers: the student's guided layer(s), by module name.
        teacher_layers: the teacher's hint layer(s), as many.
        hint_weight: weight of the hint term (RepDistiller: 100 with the mean squared error).
        feature_only_epochs: epochs of the first stage (hint only).
        keep_hint: keep the hint term after the first stage.
        temperature: ``T`` of the soft term.
        hard_weight: weight of the hard-label cross-entropy in the logit term.
        soft_loss: ``"kl"`` or ``"ce"``.

    Raises:
        ValueError: the hint would never be used, a negative weight or epoch count, or bad layer lists.
    """

    component = "hint"

    def __init__(
        self,
        student_layers: Sequence[str],
        teacher_layers: Sequence[str],
        hint_weight: float = 100.0,
        feature_only_epochs: int = 0,
        keep_hint: bool = True,
        temperature: float = 4.0,
        hard_weight: float = 0.1,
        soft_loss: str = "kl",
    ) -> None:
        super().__init__(student_layers, teacher_layers, temperature, hard_weight, soft_loss)
        if not hint_weight >= 0 or not (isinstance(feature_only_epochs, int) and feature_only_epochs >= 0):
            raise ValueError(
                "`hint_weight` and `feature_only_epochs` must be >= 0, got "
                f"hint_weight={hint_weight!r}, feature_only_epochs={feature_only_epochs!r}."
            )
        if feature_only_epochs == 0 and not keep_hint:
            raise ValueError(
                "`keep_hint=False` with `feature_only_epochs=0` never uses the hint: give the first stage some "
                "epochs, or keep the hint (a joint loss)."
            )
        self.hint_weight = hint_weight
        self.feature_only_epochs = feature_only_epochs
        self.keep_hint = keep_hint

    def adapters(
        self, student_shapes: Sequence[tuple[int, ...]], teacher_shapes: Sequence[tuple[int, ...]]
    ) -> list[nn.Module]:
        return [regressor(s, t) for s, t in zip(student_shapes, teacher_shapes, strict=True)]

    def feature_loss(self, pairs: FeaturePairs) -> Tensor:
        return sum(hint_loss(*match_spatial(s, t)) for s, t in pairs)

    def weights(self, epoch: int) -> tuple[float, float]:
        if epoch < self.feature_only_epochs:
            return 0.0, self.hint_weight
        return 1.0, self.hint_weight if self.keep_hint else 0.0


def regressor(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """FitNets' regressor from a student feature of ``student_shape`` to the teacher's channels (shapes
    without the batch axis): 1x1 convolution + BatchNorm for ``(C, H, W)`` maps, a linear layer for ``(D,)``.

    Example:
        >>> r = regressor((8, 14, 14), (16, 14, 14))
        >>> [type(m).__name__ for m in r], r[0].in_channels, r[0].out_channels
        (['Conv2d', 'BatchNorm2d'], 8, 16)
    """
    if len(student_shape) == 3 and len(teacher_shape) == 3:
        return nn.Sequential(
            nn.Conv2d(student_shape[0], teacher_shape[0], 1, bias=False), nn.BatchNorm2d(teacher_shape[0])
        )
    if len(student_shape) == 1 and len(teacher_shape) == 1:
        return nn.Linear(student_shape[0], teacher_shape[0])
    raise ValueError(
        "a FitNets regressor maps (C, H, W) maps to (C, H, W) maps or (D,) vectors to (D,) vectors, got student "
        f"{tuple(student_shape)} and teacher {tuple(teacher_shape)} features."
    )


class AttentionTransfer(FeatureObjective):
    """Attention transfer (Zagoruyko & Komodakis 2017): the student's spatial attention maps match the
    teacher's at each layer pair (:func:`~kd_lightning.losses.attention_transfer_loss`, ``beta / 2`` times
    the sum over pairs), plus Hinton's soft targets.

    The paper's attention transfer alone is ``hard_weight=1`` (cross-entropy plus the attention term; the
    soft term is computed but weighted 0); ``hard_weight < 1`` is its "AT + KD". No parameters are added:
    maps are averages over channels, so the two networks' channel counts may differ.

    Args:
        student_layers: the student's layers (e.g. the outputs of its residual groups).
        teacher_layers: the teacher's, as many, of the same spatial sizes or pooled to the smaller.
        beta: weight of the attention term (1000 in the paper's code).
        p: the attention map's power (2).
        temperature: ``T`` of the soft term.
        hard_weight: weight of the hard-label cross-entropy in the logit term (1: attention transfer alone).
        soft_loss: ``"kl"`` or ``"ce"``.
    """

    component = "at"

    def __init__(
        self,
        student_layers: Sequence[str],
        teacher_layers: Sequence[str],
        beta: float = 1000.0,
        p: float = 2.0,
        temperature: float = 4.0,
        hard_weight: float = 1.0,
        soft_loss: str = "kl",
    ) -> None:
        super().__init__(student_layers, teacher_layers, temperature, hard_weight, soft_loss)
        if not (beta >= 0 and p > 0):
            raise ValueError(f"`beta` must be >= 0 and `p` > 0, got beta={beta!r}, p={p!r}.")
        self.beta = beta
        self.p = p

    def feature_loss(self, pairs: FeaturePairs) -> Tensor:
        return attention_transfer_loss([s for s, _ in pairs], [t for _, t in pairs], self.beta, self.p)
