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
    assert float(soft_target_loss(z, v, T, kind="ce")) == pytest.approx(ce * T**2, rel=1e-5)
    # KL differs from the cross-entropy by the teacher's entropy.
    assert float(soft_target_loss(z, v, T, kind="kl")) == pytest.approx(
        (ce - entropy_at(v, T)) * T**2, rel=1e-4
    )


@pytest.mark.parametrize("kind", ["kl", "ce"])
@pytest.mark.parametrize("T", [1.0, 4.0, 10.0])
def test_gradient_is_q_minus_p_over_T(logits, kind, T):
    """Hinton et al. eq. 2: dC/dz_i = (q_i - p_i) / T, before the T**2 factor."""
    z, v = logits
    z = z[:1].clone().requires_grad_(True)
    v = v[:1]
    (soft_target_loss(z, v, T, kind=kind) / T**2).backward()
    q = F.softmax(z.detach() / T, -1)
    p = F.softmax(v / T, -1)
    torch.testing.assert_close(z.grad, (q - p) / T, rtol=1e-5, atol=1e-7)


def test_high_temperature_limit_is_logit_matching():
    """Hinton et al. eq. 4: with zero-mean logits, T**2 dC/dz_i -> (z_i - v_i) / N as T grows."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 10, generator=g)
    v = torch.randn(1, 10, generator=g)
    z, v = z - z.mean(), v - v.mean()
    zs = z.clone().requires_grad_(True)
    soft_target_loss(zs, v, 1000.0, kind="ce").backward()  # already times T**2
    zm = z.clone().requires_grad_(True)
    logit_matching_loss(zm, v).backward()
    torch.testing.assert_close(zs.grad, (z - v) / 10, rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(zm.grad, (z - v) / 10)


def test_logit_matching_ignores_constant_shift():
    z = torch.tensor([[1.0, -2.0, 0.5]])
    assert float(logit_matching_loss(z, z + 7.0)) == pytest.approx(0.0, abs=1e-10)
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
    torch.testing.assert_close(soft_target_loss_from_probs(z, p, 4.0), soft_target_loss(z, v, 4.0, kind="ce"))


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
        torch.testing.assert_close(parts["tckd"] + (1 - pt[0]) * parts["nckd"], kd, rtol=1e-4, atol=1e-6)


def test_dkd_zero_when_equal_and_positive_otherwise(logits):
    z, v = logits
    y = torch.arange(6) % 7
    assert float(dkd_loss(z, z, y)["loss"]) == pytest.approx(0.0, abs=1e-5)
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
