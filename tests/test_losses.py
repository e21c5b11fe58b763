"""Distillation maths against hand-written references and the paper's gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.losses import (
    distillation_loss,
    dkd_loss,
    logit_matching_loss,
    soft_target_loss,
    soft_target_loss_from_probs,
)
from kd_lightning.objectives import DKD, HintonKD, LogitMatching

# The losses compute in fp32 whatever their input (see kd_lightning/losses.py), so comparisons with the
# float64 references below allow fp32 rounding, bounded from eps and the size of the quantities.
EPS32 = torch.finfo(torch.float32).eps


def softmax_scale(z, v, T):
    """Size of an fp32 log-softmax entry of logits z, v at temperature T: max|logit| / T + log C."""
    return float(torch.maximum(z.abs().max(), v.abs().max())) / T + math.log(z.shape[-1])


def fp32_loss_tol(z, v, T):
    """Rounding bound of a soft-target loss (times T**2) computed in fp32: each log-softmax entry is off
    by a few (4) roundings of ``softmax_scale``, summing C of them adds up to C more, times T**2."""
    return (4 + z.shape[-1]) * EPS32 * T**2 * softmax_scale(z, v, T)


def reference_soft_ce(z, v, T):
    """Per-batch mean of -sum_i p_i log q_i at temperature T, written with Python loops."""
    total = 0.0
    for zs, vs in zip(z.tolist(), v.tolist(), strict=True):
        ez = [math.exp(a / T) for a in zs]
        ev = [math.exp(a / T) for a in vs]
        q = [a / sum(ez) for a in ez]
        p = [a / sum(ev) for a in ev]
        total += -sum(pi * math.log(qi) for pi, qi in zip(p, q, strict=True))
    return total / len(z)


def entropy_at(v, T):
    p = F.softmax(v.double() / T, -1)
    return float(-(p * p.log()).sum(-1).mean())


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 7, generator=g) * 3, torch.randn(6, 7, generator=g) * 3


@pytest.mark.parametrize("T", [1.0, 2.5, 20.0])
def test_soft_target_loss_matches_reference(logits, T):
    z, v = logits
    ce = reference_soft_ce(z, v, T)
    tol = fp32_loss_tol(z, v, T)
    assert float(soft_target_loss(z, v, T, kind="ce")) == pytest.approx(ce * T**2, rel=0, abs=tol)
    # KL differs from the cross-entropy by the teacher's entropy.
    assert float(soft_target_loss(z, v, T, kind="kl")) == pytest.approx(
        (ce - entropy_at(v, T)) * T**2, rel=0, abs=tol
    )


@pytest.mark.parametrize("kind", ["kl", "ce"])
@pytest.mark.parametrize("T", [1.0, 4.0, 10.0])
def test_gradient_is_q_minus_p_over_T(logits, kind, T):
    """Hinton et al. eq. 2: dC/dz_i = (q_i - p_i) / T, before the T**2 factor."""
    z, v = logits
    z = z[:1].clone().requires_grad_(True)
    v = v[:1]
    (soft_target_loss(z, v, T, kind=kind) / T**2).backward()
    q = F.softmax(z.detach().double() / T, -1)
    p = F.softmax(v.double() / T, -1)
    # fp32 q and p carry a few (4) roundings of softmax_scale each, relative; q - p <= 1, then / T.
    tol = 4 * EPS32 * softmax_scale(z.detach(), v, T) / T
    torch.testing.assert_close(z.grad.double(), (q - p) / T, rtol=0, atol=tol)


def test_high_temperature_limit_is_logit_matching():
    """Hinton et al. eq. 4: with zero-mean logits, T**2 dC/dz_i -> (z_i - v_i) / N as T grows."""
    N, T = 10, 1000.0
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, N, generator=g)
    v = torch.randn(1, N, generator=g)
    z, v = z - z.mean(), v - v.mean()
    zs = z.clone().requires_grad_(True)
    soft_target_loss(zs, v, T, kind="ce").backward()  # already times T**2
    zm = z.clone().requires_grad_(True)
    logit_matching_loss(zm, v).backward()
    # The limit's error: the second-order Taylor term of T * (softmax(z/T) - softmax(v/T)) is
    # (z_i**2 - v_i**2 - mean(z**2) + mean(v**2)) / (2 N T), below (max z**2 + max v**2) / (N T).
    limit = float(z.abs().max() ** 2 + v.abs().max() ** 2) / (N * T)
    # fp32 rounding: the gradient is T * (q * sum(p) - p) with q, p ~ 1/N; sum(p) is off by up to N eps,
    # q and p by a few (4) eps each, relative; T amplifies it.
    rounding = T * EPS32 * (N + 4) / N
    torch.testing.assert_close(zs.grad, (z - v) / N, rtol=0, atol=limit + rounding)
    # The same limit in float64, where rounding is negligible: the error is the Taylor term alone.
    exact = T * (F.softmax(z.double() / T, -1) - F.softmax(v.double() / T, -1))
    torch.testing.assert_close(exact, (z - v).double() / N, rtol=0, atol=limit)
    # Logit matching's gradient is the limit itself: (z - v) / N up to a few fp32 roundings of it.
    torch.testing.assert_close(
        zm.grad, (z - v) / N, rtol=4 * EPS32, atol=4 * EPS32 * float((z - v).abs().max())
    )


def test_logit_matching_ignores_constant_shift():
    z = torch.tensor([[1.0, -2.0, 0.5]])
    # Centring z + 7 leaves a few (4) fp32 roundings of its size (8) per entry; the loss is their square.
    assert float(logit_matching_loss(z, z + 7.0)) == pytest.approx(0.0, abs=(4 * EPS32 * 8.0) ** 2)
    assert float(logit_matching_loss(z, z + 7.0, center=False)) == pytest.approx(0.5 * 49)


def test_distillation_loss_weights(logits):
    z, v = logits
    y = torch.arange(6) % 7
    ce = F.cross_entropy(z, y)
    out = distillation_loss(z, v, y, temperature=3.0, hard_weight=0.25)
    torch.testing.assert_close(out["hard"], ce)
    torch.testing.assert_close(out["soft"], soft_target_loss(z, v, 3.0))
    torch.testing.assert_close(out["loss"], 0.25 * ce + 0.75 * out["soft"])
    torch.testing.assert_close(distillation_loss(z, v, y, 3.0, 1.0)["loss"], ce)


def test_soft_loss_from_probs_equals_logit_form(logits):
    z, v = logits
    p = F.softmax(v / 4.0, -1)
    tol = fp32_loss_tol(z, v, 4.0)  # two fp32 paths to the same cross-entropy
    torch.testing.assert_close(
        soft_target_loss_from_probs(z, p, 4.0), soft_target_loss(z, v, 4.0, kind="ce"), rtol=0, atol=tol
    )


def test_losses_are_fp32_under_autocast(logits):
    z, v = (t.to(torch.bfloat16) for t in logits)
    y = torch.arange(6) % 7
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = distillation_loss(z, v, y, temperature=4.0, hard_weight=0.1)
        dkd = dkd_loss(z, v, y)
    assert out["loss"].dtype == torch.float32 and dkd["loss"].dtype == torch.float32
    ref = distillation_loss(z.float(), v.float(), y, temperature=4.0, hard_weight=0.1)
    torch.testing.assert_close(out["loss"], ref["loss"])


def test_dkd_decomposes_classic_kd():
    """Zhao et al. eq. 7: KD = TCKD + (1 - p_t^teacher) * NCKD, per sample."""
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        z, v = torch.randn(1, 5, generator=g) * 2, torch.randn(1, 5, generator=g) * 2
        y = torch.randint(0, 5, (1,), generator=g)
        T = 2.0
        parts = dkd_loss(z, v, y, alpha=1.0, beta=1.0, temperature=T)
        pt = F.softmax(v / T, -1)[0, y]
        kd = soft_target_loss(z, v, T, kind="kl")
        # Three fp32 losses of the same logits, each within fp32_loss_tol of its exact value.
        tol = 3 * fp32_loss_tol(z, v, T)
        torch.testing.assert_close(parts["tckd"] + (1 - pt[0]) * parts["nckd"], kd, rtol=0, atol=tol)


def test_dkd_zero_when_equal_and_positive_otherwise(logits):
    z, v = logits
    y = torch.arange(6) % 7
    # alpha * TCKD + beta * NCKD (defaults 1, 8) of equal logits: exactly 0, up to fp32 rounding of each.
    assert float(dkd_loss(z, z, y)["loss"]) == pytest.approx(0.0, abs=9 * fp32_loss_tol(z, z, 4.0))
    assert float(dkd_loss(z, v, y)["loss"]) > 0


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf")])
def test_bad_temperature_named(bad):
    with pytest.raises(ValueError, match="temperature"):
        HintonKD(temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        soft_target_loss(torch.zeros(1, 2), torch.zeros(1, 2), bad)


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_bad_hard_weight_named(bad):
    with pytest.raises(ValueError, match="hard_weight"):
        HintonKD(hard_weight=bad)
    with pytest.raises(ValueError, match="hard_weight"):
        LogitMatching(hard_weight=bad)


def test_shape_mismatch_and_unknown_kind():
    with pytest.raises(ValueError, match="same shape"):
        soft_target_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="kind"):
        soft_target_loss(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, kind="js")


def test_dkd_warmup_ramps_kd_terms(logits):
    z, v = logits
    y = torch.arange(6) % 7
    obj = DKD(warmup_epochs=4)
    first, late = obj(z, v, y, epoch=0), obj(z, v, y, epoch=10)
    torch.testing.assert_close(first["loss"] - first["hard"], 0.25 * (late["loss"] - late["hard"]))
