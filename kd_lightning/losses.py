"""Distillation losses as pure, typed functions.

Every function upcasts its logits to fp32 first: under autocast (bf16 on CPU, fp16/bf16 on GPU) a
softmax at high temperature loses most of its mantissa, and the soft-target term is a difference
of nearly equal log-probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SOFT_LOSSES = ("kl", "ce")


def check_temperature(temperature: float, name: str = "temperature") -> None:
    """Raise a ValueError naming ``name`` unless ``temperature`` is a positive finite number."""
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
        raise ValueError(f"`{name}` must be a positive number, got {temperature!r}.")


def check_weight(weight: float, name: str = "hard_weight") -> None:
    """Raise a ValueError naming ``name`` unless ``0 <= weight <= 1``."""
    if not (isinstance(weight, (int, float)) and 0.0 <= weight <= 1.0):
        raise ValueError(f"`{name}` must lie in [0, 1], got {weight!r}.")


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must have the same shape (batch, num_classes), got "
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}."
        )


def soft_target_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, kind: str = "kl"
) -> Tensor:
    """Hinton et al.'s soft-target term, multiplied by ``T**2``, averaged over the batch.

    Both distributions are softened at ``T``. ``kind="kl"`` gives ``KL(p_T || q_T)``;
    ``kind="ce"`` gives the cross-entropy ``H(p_T, q_T)``, which differs by the teacher's entropy,
    a constant for the student: same gradients, different value.

    Args:
        student_logits: ``(N, C)`` raw student logits.
        teacher_logits: ``(N, C)`` raw teacher logits (no gradient needed).
        temperature: softmax temperature ``T > 0``.
        kind: ``"kl"`` or ``"ce"``.

    Returns:
        A scalar fp32 tensor.

    Raises:
        ValueError: on a non-positive temperature, an unknown ``kind`` or mismatched shapes.

    Example:
        >>> z = torch.tensor([[2.0, 0.0, -1.0]])
        >>> float(soft_target_loss(z, z, temperature=4.0))
        0.0
    """
    check_temperature(temperature)
    if kind not in SOFT_LOSSES:
        raise ValueError(f"`kind` must be one of {SOFT_LOSSES}, got {kind!r}.")
    _check_pair(student_logits, teacher_logits)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    p = log_p.exp()
    per_sample = (p * (log_p - log_q)).sum(-1) if kind == "kl" else -(p * log_q).sum(-1)
    return per_sample.mean() * temperature**2


def soft_target_loss_from_probs(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """Cross-entropy against precomputed soft targets ``p_T`` (already at temperature ``T``), times ``T**2``.

    Used where the teacher's output is stored as probabilities (e.g. top-k with residual mass).

    Example:
        >>> p = torch.tensor([[0.5, 0.5]])
        >>> round(float(soft_target_loss_from_probs(torch.zeros(1, 2), p, 1.0)), 4)
        0.6931
    """
    check_temperature(temperature)
    _check_pair(student_logits, teacher_probs)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(teacher_probs.float() * log_q).sum(-1).mean() * temperature**2


def logit_matching_loss(student_logits: Tensor, teacher_logits: Tensor, center: bool = True) -> Tensor:
    """Squared error between logits: the high-temperature limit of distillation (Hinton et al. §2.1).

    With zero-mean logits, ``T**2 * dC/dz_i -> (z_i - v_i) / N`` as ``T -> inf``; this loss is
    ``0.5 * mean over the batch of sum_i (z_i - v_i)**2 / N``, whose gradient is exactly that limit.

    Args:
        student_logits: ``(N, C)``.
        teacher_logits: ``(N, C)``.
        center: subtract each row's mean first (the paper's zero-mean assumption), so a constant
            shift of the teacher's logits, which changes no probability, costs nothing.

    Example:
        >>> s = torch.tensor([[1.0, 0.0]]); t = torch.tensor([[3.0, 2.0]])
        >>> float(logit_matching_loss(s, t)), float(logit_matching_loss(s, t, center=False))
        (0.0, 2.0)
    """
    _check_pair(student_logits, teacher_logits)
    s, t = student_logits.float(), teacher_logits.float()
    if center:
        s = s - s.mean(-1, keepdim=True)
        t = t - t.mean(-1, keepdim=True)
    return 0.5 * (s - t).pow(2).mean(-1).sum() / s.shape[0]


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float,
    hard_weight: float,
    kind: str = "kl",
) -> dict[str, Tensor]:
    """Hinton et al.'s objective: ``hard_weight * CE(y, q_1) + (1 - hard_weight) * T**2 * soft``.

    Args:
        student_logits: ``(N, C)``.
        teacher_logits: ``(N, C)``.
        target: ``(N,)`` integer labels.
        temperature: ``T > 0`` for the soft term; the hard term is at ``T = 1``.
        hard_weight: weight of the hard-label term in ``[0, 1]``.
        kind: ``"kl"`` or ``"ce"`` for the soft term.

    Returns:
        ``{"loss", "hard", "soft"}``; ``soft`` already includes the ``T**2`` factor.

    Raises:
        ValueError: on a bad temperature or weight (the message names the argument).

    Example:
        >>> z = torch.tensor([[4.0, 0.0]]); y = torch.tensor([0])
        >>> out = distillation_loss(z, z, y, temperature=2.0, hard_weight=0.0)
        >>> float(out["loss"])
        0.0
    """
    check_weight(hard_weight)
    soft = soft_target_loss(student_logits, teacher_logits, temperature, kind)
    hard = F.cross_entropy(student_logits.float(), target)
    return {"loss": hard_weight * hard + (1.0 - hard_weight) * soft, "hard": hard, "soft": soft}


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> dict[str, Tensor]:
    """Decoupled KD (Zhao et al. 2022): ``alpha * TCKD + beta * NCKD``, each times ``T**2``.

    TCKD is the binary KL between teacher and student on (target, all others); NCKD is the KL
    between their distributions over the non-target classes, each renormalised. Classic KD equals
    ``TCKD + (1 - p_t) * NCKD``.

    Args:
        student_logits: ``(N, C)``.
        teacher_logits: ``(N, C)``.
        target: ``(N,)`` integer labels.
        alpha: weight of the target-class term.
        beta: weight of the non-target-class term.
        temperature: ``T > 0``.

    Returns:
        ``{"loss", "tckd", "nckd"}``.

    Example:
        >>> z = torch.tensor([[3.0, 1.0, 0.0]]); y = torch.tensor([0])
        >>> float(dkd_loss(z, z, y)["loss"])
        0.0
    """
    check_temperature(temperature)
    _check_pair(student_logits, teacher_logits)
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    gt = F.one_hot(target, s.shape[-1]).bool()
    ps, pt = s.softmax(-1), t.softmax(-1)
    # Binary distributions (p_target, p_rest); clamp so log() of a saturated teacher stays finite.
    bs = torch.stack([ps[gt], 1 - ps[gt]], -1).clamp_min(1e-12)
    bt = torch.stack([pt[gt], 1 - pt[gt]], -1).clamp_min(1e-12)
    tckd = (bt * (bt.log() - bs.log())).sum(-1).mean() * temperature**2
    # Non-target distributions: mask the target logit out before the softmax.
    big = torch.finfo(s.dtype).max / 4
    log_qs = F.log_softmax(s.masked_fill(gt, -big), -1)
    log_qt = F.log_softmax(t.masked_fill(gt, -big), -1)
    nckd = (log_qt.exp() * (log_qt - log_qs)).masked_fill(gt, 0).sum(-1).mean() * temperature**2
    return {"loss": alpha * tckd + beta * nckd, "tckd": tckd, "nckd": nckd}
