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


# ----------------------------------------------------------------------------------------------------
# Intermediate representations: FitNets hints and attention transfer.


def match_spatial(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Bring two ``(N, C, H, W)`` feature maps to the same height and width: the larger of each side is
    average-pooled (``adaptive_avg_pool2d``) to the smaller. Maps of equal size are returned as they are.

    Raises:
        ValueError: the batch sizes differ, or maps of different sizes are not 4-d.

    Example:
        >>> s, t = match_spatial(torch.ones(2, 3, 8, 8), torch.ones(2, 5, 4, 4))
        >>> tuple(s.shape), tuple(t.shape)
        ((2, 3, 4, 4), (2, 5, 4, 4))
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher features must have the same batch size, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}."
        )
    if student.shape[2:] == teacher.shape[2:]:
        return student, teacher
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            "features of different spatial sizes must be (N, C, H, W) maps to be pooled to one size, got "
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}."
        )
    size = (min(student.shape[2], teacher.shape[2]), min(student.shape[3], teacher.shape[3]))

    def pooled(x: Tensor) -> Tensor:
        return x if tuple(x.shape[2:]) == size else F.adaptive_avg_pool2d(x, size)

    return pooled(student), pooled(teacher)


def hint_loss(regressed: Tensor, teacher_feature: Tensor) -> Tensor:
    """FitNets' hint loss (Romero et al. 2015): squared error between the regressed student feature
    ``r(v)`` and the teacher's hint ``u``, averaged over every element (batch, channels, positions).

    The paper writes ``1/2 ||u - r(v)||^2`` per sample; the mean differs from it by a constant factor
    (``2 / (C H W)``), which the objective's weight absorbs (RepDistiller's ``nn.MSELoss`` is this mean).

    Args:
        regressed: the student's feature after its regressor, ``(N, ...)`` of the teacher's shape.
        teacher_feature: the teacher's feature (no gradient needed).

    Returns:
        A scalar fp32 tensor.

    Raises:
        ValueError: the shapes differ (a regressor must map the student's channels to the teacher's).

    Example:
        >>> u = torch.zeros(1, 2, 1, 1); r = torch.tensor([[[[1.0]], [[3.0]]]])
        >>> float(hint_loss(r, u))
        5.0
    """
    if regressed.shape != teacher_feature.shape:
        raise ValueError(
            "the regressed student feature and the teacher's feature must have the same shape, got "
            f"{tuple(regressed.shape)} and {tuple(teacher_feature.shape)}."
        )
    return F.mse_loss(regressed.float(), teacher_feature.float())


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """Zagoruyko & Komodakis' (2017) activation-based spatial attention map, flattened and L2-normalised.

    ``Q = vec(mean_c |A_c|**p)``, then ``Q / ||Q||_2`` per sample. The paper sums over channels; the
    authors' code averages, which the normalisation makes identical.

    Args:
        feature: ``(N, C, ...)`` activations (at least one spatial axis).
        p: the power (the paper's ``p = 2``).

    Returns:
        ``(N, positions)`` fp32, each row of unit L2 norm (or zero for an all-zero feature).

    Example:
        >>> a = torch.zeros(1, 1, 1, 2); a[..., 0] = 3.0
        >>> attention_map(a).tolist()
        [[1.0, 0.0]]
    """
    if feature.dim() < 3:
        raise ValueError(f"an attention map needs (N, C, H, ...) features, got shape {tuple(feature.shape)}.")
    if not p > 0:
        raise ValueError(f"`p` must be positive, got {p!r}.")
    return F.normalize(feature.float().abs().pow(p).mean(1).flatten(1), dim=1)


def attention_transfer_loss(
    student_features: list[Tensor], teacher_features: list[Tensor], beta: float = 1000.0, p: float = 2.0
) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017): ``beta / 2 * sum_j mean_{n,i} (Q_S^j - Q_T^j)**2``.

    ``Q^j`` is :func:`attention_map` of the ``j``-th pair of features, pooled to a common size first
    (:func:`match_spatial`). The paper writes the per-pair term as the norm ``||Q_S/||Q_S|| - Q_T/||Q_T|| ||_2``
    with ``beta`` "10^3 divided by the number of elements in the attention map and the batch size"; its
    published code (and RepDistiller's) uses the squared difference averaged over batch and positions with
    ``beta = 1000``, which is what this computes.

    Args:
        student_features: the student's ``(N, C_j, H_j, W_j)`` features, one per pair.
        teacher_features: the teacher's, in the same order (channel counts may differ).
        beta: the weight (1000 in the paper's code).
        p: the attention map's power.

    Returns:
        A scalar fp32 tensor.

    Raises:
        ValueError: no pairs, or lists of different lengths.

    Example:
        >>> f = torch.rand(2, 3, 4, 4)
        >>> float(attention_transfer_loss([f], [2.0 * f]))  # maps are normalised: a scale costs nothing
        0.0
    """
    if not student_features or len(student_features) != len(teacher_features):
        raise ValueError(
            "attention transfer needs one teacher feature per student feature, and at least one pair; got "
            f"{len(student_features)} student and {len(teacher_features)} teacher features."
        )
    total = torch.zeros((), dtype=torch.float32, device=student_features[0].device)
    for s, t in zip(student_features, teacher_features, strict=True):
        s, t = match_spatial(s, t)
        total = total + (attention_map(s, p) - attention_map(t, p)).pow(2).mean()
    return beta / 2 * total
