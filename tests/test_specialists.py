"""Specialists: the KL-combination solver against closed forms and a gradient-descent reference, the
dustbin correction, the oversampler, initialisation from the generalist, the ensemble and bad inputs
(the training workflow: tests/test_workflows.py)."""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import pytest
import torch
from torch import nn
from trainers import quiet_trainer

from kd_lightning.clustering import ClassGroups
from kd_lightning.costs import forward_flops
from kd_lightning.datamodules import IndexedDataModule, Synthetic
from kd_lightning.datamodules.specialist import GroupOversampler, SpecialistDataModule
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.modules import ClassifierModule, load_teacher
from kd_lightning.specialists import (
    SpecialistData,
    SpecialistEnsemble,
    SpecialistModule,
    active_specialists,
    average_specialists,
    combination_objective,
    dustbin_correction,
    head_layer,
    init_from_generalist,
    kl_combination,
    load_specialist,
    oversampling_factor,
)

NET = partial(MLP, hidden=(16,))


class EvalOutputs(L.Callback):
    """What the validation and test steps return (the EvalOutput contract), batch by batch."""

    def __init__(self) -> None:
        self.outputs: list = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.outputs.append((outputs, batch))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.outputs.append((outputs, batch))


# The solver computes in float64 and returns the inputs' dtype (at least fp32): identities are checked on
# float64 inputs, to a few roundings; fp32 outputs allow their own rounding.
EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps


def random_probs(n: int, c: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return (scale * torch.randn(n, c, generator=torch.Generator().manual_seed(seed))).softmax(-1)


def random_problem(n: int = 64, seed: int = 0):
    """A generalist over 12 classes and 4 overlapping specialists, each active where the top-3 meet it."""
    pg = random_probs(n, 12, seed)
    groups = [[0, 1, 2, 3], [3, 4, 5], [6, 7, 8, 9, 0], [10, 11, 5]]
    specialists = [random_probs(n, len(g) + 1, seed + 1 + k) for k, g in enumerate(groups)]
    membership = torch.zeros(len(groups), 12, dtype=torch.bool)
    for k, g in enumerate(groups):
        membership[k, g] = True
    return pg, specialists, groups, active_specialists(pg, membership, top_n=3)


# ------------------------------------------------------------------------------------------ solver


def test_no_active_specialist_returns_the_generalist():
    pg, specialists, groups, _ = random_problem()
    pg, specialists = pg.double(), [p.double() for p in specialists]
    none = torch.zeros(pg.shape[0], len(groups), dtype=torch.bool)
    out = kl_combination(pg, specialists, groups, none)
    # One step from the floored start gives p_g itself, up to a few (4) roundings of values <= 1.
    torch.testing.assert_close(out.probs, pg, atol=4 * EPS64, rtol=0)
    assert out.iterations == 1 and out.converged.all()
    # KL(p_g || p_g): C terms |p log p| <= 1, each a few roundings off.
    assert out.objective.abs().max() <= 4 * pg.shape[-1] * EPS64


def test_full_coverage_with_empty_dustbin_is_the_mean():
    """A specialist over every class with an empty dustbin is a second full distribution: the minimiser
    of KL(p_g || q) + KL(p_m || q) is their arithmetic mean."""
    pg = random_probs(32, 6, 0).double()
    pm = torch.cat([random_probs(32, 6, 1), torch.zeros(32, 1)], -1).double()
    out = kl_combination(pg, [pm], [list(range(6))])
    # No dustbin mass: one EM step, (p_g + p_m) / 2 from the floored start, a few roundings of values <= 1.
    torch.testing.assert_close(out.probs, (pg + pm[:, :-1]) / 2, atol=4 * EPS64, rtol=0)


def test_one_specialist_matches_its_closed_form():
    """One specialist over group G: q = (p_g + p_m) / 2 on G, and outside G the generalist's shape
    scaled to the mass (p_g(not G) + p_m(dustbin)) / 2."""
    pg = random_probs(16, 7, 2)
    group = [1, 4, 5]
    pm = random_probs(16, 4, 3)
    tol = 1e-12
    out = kl_combination(pg, [pm], [group], tol=tol)
    outside = torch.tensor([c not in group for c in range(7)])
    expected = pg.clone()
    expected[:, group] = (pg[:, group] + pm[:, :-1]) / 2
    mass = (pg[:, outside].sum(-1, keepdim=True) + pm[:, -1:]) / 2
    expected[:, outside] = pg[:, outside] / pg[:, outside].sum(-1, keepdim=True) * mass
    # Convergence, not rounding, limits the match. After one EM step the mass outside G is exact, and the
    # error of its shape shrinks by r = p_m(dustbin) / (p_g(not G) + p_m(dustbin)) per step; the solver
    # stops once a step gains <= tol, so the objective is within tol r^2 / (1 - r^2) of its minimum,
    # where its curvature is >= 2: q is within sqrt(tol r^2 / (1 - r^2)) to second order (twice that
    # allowed for the higher orders), plus the fp32 output's rounding.
    r = float((pm[:, -1] / (pg[:, outside].sum(-1) + pm[:, -1])).max())
    atol = 2 * math.sqrt(tol * r**2 / (1 - r**2)) + EPS32
    torch.testing.assert_close(out.probs, expected, atol=atol, rtol=0)


def test_objective_decreases_monotonically_and_matches_gradient_descent():
    pg, specialists, groups, active = random_problem()
    assert active.sum(-1).max() >= 2  # several specialists per input, overlapping groups
    pg64, specialists64 = pg.double(), [p.double() for p in specialists]
    trace = torch.stack(
        [
            kl_combination(pg64, specialists64, groups, active, max_iter=k, tol=0.0).objective
            for k in range(1, 40)
        ]
    )
    # EM never increases the objective; its float64 value (<= 2 C terms of size <= 1) rounds by a few eps.
    assert (trace[1:] <= trace[:-1] + 8 * pg.shape[-1] * EPS64).all()
    solved = kl_combination(pg, specialists, groups, active, tol=1e-10)
    assert solved.converged.all() and solved.iterations < 500
    # fp32 output: the probabilities' rounding moves the sum by <= EPS32 / 2, and summing C of them in
    # fp32 adds up to (C - 1) EPS32 / 2 more.
    tol = pg.shape[-1] * EPS32 / 2
    torch.testing.assert_close(solved.probs.sum(-1), torch.ones(pg.shape[0]), atol=tol, rtol=0)
    # The paper's way: gradient descent on the logits z of q = softmax(z) (here L-BFGS, fp64).
    z = pg.double().log().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [z], max_iter=300, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = combination_objective(z.softmax(-1), pg, specialists, groups, active).sum()
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)
    reference = z.detach().softmax(-1)
    # Convergence limits the match (rounding is far below): rows stop when a step gains <= 1e-10 nats,
    # which leaves q within 2 sqrt(1e-10 r^2 / (1 - r^2)) for EM rate r (as in the closed-form test
    # above); 20 sqrt(1e-10) holds for any r <= 0.995.
    torch.testing.assert_close(solved.probs.double(), reference, atol=20 * math.sqrt(1e-10), rtol=0)
    ours = combination_objective(solved.probs, pg, specialists, groups, active)
    theirs = combination_objective(reference, pg, specialists, groups, active)
    # The fp32 output's total mass is off by up to C EPS32 / 2, which moves the objective by up to
    # (1 + active specialists) times that (the weight of its mass constraint).
    slack = (1 + int(active.sum(-1).max())) * pg.shape[-1] * EPS32 / 2
    assert (ours <= theirs + slack).all()


def test_batched_equals_one_input_at_a_time():
    """Rows are independent: the same number of EM steps gives the same q, batched or one at a time (a
    fixed count, so that the stopping rule, which waits for the slowest row of a batch, plays no part)."""
    pg, specialists, groups, active = random_problem(n=8, seed=5)
    pg, specialists = pg.double(), [p.double() for p in specialists]
    steps = 5
    batched = kl_combination(pg, specialists, groups, active, max_iter=steps, tol=0.0)
    assert batched.iterations == steps
    for i in range(8):
        single = kl_combination(
            pg[i : i + 1],
            [p[i : i + 1] for p in specialists],
            groups,
            active[i : i + 1],
            max_iter=steps,
            tol=0.0,
        )
        assert single.iterations == steps
        # The same arithmetic per row, but a batched product may sum in another order: a few (4)
        # roundings of values <= 1 per step.
        torch.testing.assert_close(batched.probs[i : i + 1], single.probs, atol=4 * steps * EPS64, rtol=0)


def test_average_of_the_most_confident_specialists():
    pg = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    groups = [[0, 1], [1, 2]]
    pa = torch.tensor([[0.6, 0.2, 0.2]])  # confidence 0.6
    pb = torch.tensor([[0.9, 0.05, 0.05]])  # confidence 0.9: class 1
    both = torch.tensor([[True, True]])
    top1 = average_specialists(pg, [pa, pb], groups, both, top=1)
    assert top1.argmax().item() == 1 and top1[0, 1].item() == pytest.approx(0.9)
    top2 = average_specialists(pg, [pa, pb], groups, both, top=2)
    torch.testing.assert_close(top2.sum(-1), torch.ones(1))
    assert torch.equal(average_specialists(pg, [pa, pb], groups, torch.zeros(1, 2, dtype=torch.bool)), pg)


def test_solver_input_errors():
    pg = random_probs(4, 5, 0)
    with pytest.raises(ValueError, match=r"`specialist_probs\[0\]` must have shape \(4, 3\)"):
        kl_combination(pg, [random_probs(4, 4, 1)], [[0, 1]])
    with pytest.raises(ValueError, match="one group per specialist"):
        kl_combination(pg, [random_probs(4, 3, 1)], [[0, 1], [2]])
    with pytest.raises(ValueError, match=r"`top_n` must be an integer in \[1, 5\]"):
        active_specialists(pg, torch.ones(1, 5, dtype=torch.bool), 0)


# --------------------------------------------------------------------------------- dustbin, sampler


def test_dustbin_correction_is_the_log_oversampling_factor_and_the_bayes_prior_shift():
    f, r = 0.1, 0.5
    assert dustbin_correction(f, r) == pytest.approx(math.log(oversampling_factor(f, r)))
    assert oversampling_factor(f, r) == pytest.approx((r / (1 - r)) / (f / (1 - f)))
    # A Bayes classifier of the training batches, corrected, is the Bayes classifier of the data.
    likelihood = torch.rand(
        10, 4, generator=torch.Generator().manual_seed(0)
    )  # p(x | y): 3 group labels + dustbin
    prior = torch.tensor([0.04, 0.03, 0.03, 0.9])  # group share f = 0.1
    train_prior = torch.cat([prior[:3] / 0.1 * r, torch.tensor([1 - r])])
    natural = (likelihood * prior).log().log_softmax(-1)
    trained = (likelihood * train_prior).log()
    corrected = trained + torch.tensor([0.0, 0.0, 0.0, dustbin_correction(0.1, r)])
    # fp32 log-probabilities: a few (8) roundings of their largest size.
    tol = 8 * EPS32 * float(natural.abs().max())
    torch.testing.assert_close(corrected.log_softmax(-1), natural, atol=tol, rtol=0)
    with pytest.raises(ValueError, match=r"`batch_fraction` must lie in \(0, 1\)"):
        oversampling_factor(0.1, 1.0)


def test_oversampler_proportion_determinism_and_coverage():
    targets = torch.arange(200) % 10  # 10 classes, 20 samples each
    sampler = GroupOversampler(targets, classes=[2, 7], group_fraction=0.5, seed=3)
    first = list(sampler)
    in_group = sum(int(targets[i]) in (2, 7) for i in first)
    assert len(first) == 200 and in_group == 100
    assert sampler.data_fraction == pytest.approx(0.2) and sampler.batch_fraction == 0.5
    # Every group sample is drawn 2 or 3 times (whole permutations first), never favoured.
    counts = torch.bincount(torch.tensor(first), minlength=200)[(targets == 2) | (targets == 7)]
    assert counts.min() >= 2 and counts.max() <= 3
    assert list(sampler) == first  # same seed and epoch: same order on every process
    sampler.set_epoch(1)
    assert list(sampler) != first
    with pytest.raises(ValueError, match="no sample outside the group"):
        GroupOversampler(targets, classes=list(range(10)))
    with pytest.raises(
        ValueError, match=r"`oversample` \(the group's share of each batch\) must lie in \(0, 1\)"
    ):
        GroupOversampler(targets, classes=[1], group_fraction=1.5)


# -------------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("factory", [NET, partial(SmallCNN, channels=(4,), head=16)], ids=["mlp", "cnn"])
def test_specialist_reproduces_the_generalist_group_logits(tmp_path, tiny_dm, factory):
    """Before any training, the specialist's logits of its group's classes are the generalist's (BatchNorm
    statistics included); the dustbin has no correction yet."""
    L.seed_everything(0)
    generalist = ClassifierModule(factory, 6, (1, 8, 8))
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(generalist, tiny_dm(num_classes=6))  # a few steps: non-trivial weights and BN statistics
    trainer.save_checkpoint(tmp_path / "generalist.ckpt")
    group = [4, 1, 3]
    specialist = SpecialistModule(
        factory,
        6,
        (1, 8, 8),
        classes=group,
        generalist_ckpt=str(tmp_path / "generalist.ckpt"),
        init_from="generalist",
    )
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        expected = load_teacher(tmp_path / "generalist.ckpt")(x)[:, group]
        got = specialist.eval()(x)
    torch.testing.assert_close(got[:, :3], expected)
    assert got.shape == (5, 4) and float(specialist.dustbin_shift) == 0.0


def test_head_rule():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert head_layer(net) == ("2", net[2])
    with pytest.raises(ValueError, match="has no nn.Linear"):
        head_layer(nn.Sequential(nn.Conv2d(1, 2, 3)))
    with pytest.raises(ValueError, match="outputs 8 logits, expected 4"):
        init_from_generalist(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 8)), net, [0, 1, 2])
    with pytest.raises(ValueError, match="must be the generalist's architecture"):
        init_from_generalist(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)), net, [0, 1])
    with pytest.raises(ValueError, match="the head must output the logits"):
        SpecialistModule(
            lambda shape, n: nn.Sequential(nn.Linear(8, n), nn.Linear(n, 2)), 6, (8,), classes=[0, 1, 2]
        )


def test_specialist_of_its_own_architecture_starts_from_scratch_or_names_the_mismatch(tmp_path):
    """A specialist's network may differ from the generalist's: from scratch always, from the generalist
    only where every parameter but the head's has the generalist's shape (else an error naming them)."""
    L.seed_everything(0)
    generalist = ClassifierModule(NET, 6, (8,))
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(generalist, IndexedDataModule(tiny_source(), batch_size=32, val_size=40))
    ckpt = str(tmp_path / "generalist.ckpt")
    trainer.save_checkpoint(ckpt)
    smaller, deeper = partial(MLP, hidden=(4,)), partial(MLP, hidden=(16, 16))
    # From scratch: any architecture, the head sized by the group plus the dustbin.
    small = SpecialistModule(smaller, 6, (8,), classes=[0, 3], generalist_ckpt=ckpt, init_from="scratch")
    assert small.net.net[1].weight.shape == (4, 8) and small.num_outputs == 3
    assert small(torch.randn(2, 8)).shape == (2, 3)
    # Same architecture from scratch: the generalist's weights are not copied.
    same = SpecialistModule(NET, 6, (8,), classes=[0, 3], generalist_ckpt=ckpt, init_from="scratch")
    assert not torch.equal(same.net.net[1].weight, generalist.net.net[1].weight)
    # From the generalist (explicitly, or by default when a generalist is given): shapes must match.
    with pytest.raises(
        ValueError,
        match=r"`init_from`='generalist': .* different shapes \['net\.1\.bias \(specialist \(4,\), generalist "
        r"\(16,\)\)', 'net\.1\.weight \(specialist \(4, 8\), generalist \(16, 8\)\)'\]\. Give `init_from: scratch`",
    ):
        SpecialistModule(smaller, 6, (8,), classes=[0, 3], generalist_ckpt=ckpt)
    with pytest.raises(
        ValueError, match=r"parameters the generalist lacks \['net\.3\.bias', 'net\.3\.weight'\]"
    ):
        SpecialistModule(deeper, 6, (8,), classes=[0, 3], generalist_ckpt=ckpt, init_from="generalist")
    with pytest.raises(
        ValueError, match="`init_from`='generalist' needs the generalist: pass `generalist_ckpt`"
    ):
        SpecialistModule(NET, 6, (8,), classes=[0], init_from="generalist")
    with pytest.raises(ValueError, match="`init_from` must be one of generalist, scratch"):
        SpecialistModule(NET, 6, (8,), classes=[0], init_from="teacher")


# ------------------------------------------------------------------------ training and the ensemble


def tiny_source() -> Synthetic:
    return Synthetic(
        num_superclasses=3, classes_per_superclass=2, dim=8, train_per_class=40, test_per_class=10
    )


@pytest.fixture
def trained(tmp_path):
    """A generalist on 6 classes, a groups file {0,1}, {2,3}, and one specialist per group."""
    L.seed_everything(0)
    source = tiny_source()
    data = IndexedDataModule(source, batch_size=32, eval_batch_size=64, val_size=40)
    generalist = ClassifierModule(NET, 6, (8,))
    trainer = quiet_trainer(tmp_path, max_epochs=3)
    trainer.fit(generalist, data)
    trainer.save_checkpoint(tmp_path / "generalist.ckpt")
    groups_file = ClassGroups(6, source.class_names, [[0, 1], [2, 3]]).save(tmp_path / "groups.json")
    checkpoints = []
    for g in range(2):
        # The data owns the group; the model is given it (what `kd` links).
        specialist_data = SpecialistDataModule(
            source, batch_size=32, eval_batch_size=64, val_size=40, groups_file=str(groups_file), group=g
        )
        specialist = SpecialistModule(
            NET,
            6,
            (8,),
            classes=specialist_data.group_classes,
            group=g,
            groups_file=str(groups_file),
            generalist_ckpt=str(tmp_path / "generalist.ckpt"),
            soft_weight=0.5 if g else 0.0,
        )
        trainer = quiet_trainer(tmp_path, max_steps=4, limit_val_batches=1)
        trainer.fit(specialist, specialist_data)
        trainer.save_checkpoint(tmp_path / f"group{g}.ckpt")
        checkpoints.append(tmp_path / f"group{g}.ckpt")
        assert torch.isfinite(trainer.callback_metrics["train/loss"])
        if g:
            assert "train/soft" in trainer.callback_metrics
    return {
        "source": source,
        "data": data,
        "groups": groups_file,
        "checkpoints": checkpoints,
        "dir": tmp_path,
    }


def test_specialist_training_sets_the_dustbin_correction(trained):
    specialist = load_specialist(trained["checkpoints"][0])
    f = 2 / 6  # two of six balanced classes (the split is random: compare with the sampler's own numbers)
    assert float(specialist.dustbin_shift) == pytest.approx(math.log(oversampling_factor(f, 0.5)), abs=0.1)
    checkpoint = torch.load(trained["checkpoints"][1], weights_only=False)
    assert not any(
        k.startswith("generalist.") for k in checkpoint["state_dict"]
    )  # soft-target teacher left out
    assert checkpoint["kd_lightning_specialist"]["classes"] == [2, 3]
    assert checkpoint["kd_lightning_specialist"]["group"] == 1
    assert checkpoint["kd_lightning_specialist"]["groups_file"] == str(trained["groups"])
    # The checkpoint alone is enough: no groups file, no generalist.
    trained["groups"].unlink()
    assert load_specialist(trained["checkpoints"][1]).group_classes == [2, 3]
    # A checkpoint from before the data owned the relabelling (the model's `label_map` buffer) still loads.
    checkpoint["state_dict"]["label_map"] = torch.tensor([0, 0, 0, 1, 2, 2])
    torch.save(checkpoint, trained["dir"] / "old.ckpt")
    assert load_specialist(trained["dir"] / "old.ckpt").group_classes == [2, 3]


def test_correction_equals_the_samplers_log_oversampling_factor(tmp_path):
    source = tiny_source()
    data = SpecialistDataModule(source, batch_size=16, val_size=40, oversample=0.75, classes=[5])
    specialist = SpecialistModule(NET, 6, (8,), classes=[5])
    quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(specialist, data)
    sampling = data.group_sampling
    assert sampling.batch_fraction == pytest.approx(0.75, abs=1e-2)
    # The shift is kept in an fp32 buffer: rounded to within EPS32 / 2 of itself.
    assert float(specialist.dustbin_shift) == pytest.approx(
        math.log(oversampling_factor(sampling.data_fraction, sampling.batch_fraction)), rel=EPS32
    )
    batch = next(iter(data.train_dataloader()))
    batch = data.on_before_batch_transfer(batch, 0)
    assert torch.equal(batch["specialist_target"], torch.where(batch["target"] == 5, 0, 1))
    assert isinstance(data, SpecialistData) and not isinstance(IndexedDataModule(source), SpecialistData)
    # Validation returns the corrected logits over the group plus the dustbin, and the specialist's labels.
    seen = EvalOutputs()
    quiet_trainer(tmp_path, callbacks=[seen], limit_val_batches=1).validate(specialist, data, verbose=False)
    (out, batch), *_ = seen.outputs
    assert set(out) == {"logits", "target"} and out["logits"].shape == (len(batch["target"]), 2)
    assert torch.equal(out["target"], batch["specialist_target"]) and not out["logits"].requires_grad
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], specialist.eval()(batch["input"].clone()))


def test_ensemble_reports_and_rejects_mismatched_specialists(trained, tmp_path):
    d = trained
    ensemble = SpecialistEnsemble(
        str(d["dir"] / "generalist.ckpt"), [str(p) for p in d["checkpoints"]], str(d["groups"])
    )
    seen = EvalOutputs()
    metrics = quiet_trainer(tmp_path, callbacks=[seen]).test(ensemble, d["data"], verbose=False)[0]
    # Each test step returns the KL combination's log-probabilities and the full-space target.
    for out, batch in seen.outputs:
        assert set(out) == {"logits", "target"} and torch.equal(out["target"], batch["target"])
        with torch.no_grad():
            torch.testing.assert_close(out["logits"], ensemble(batch["input"].clone()))
    # Every network is frozen: eval mode after train(), no gradients, nothing of them in a checkpoint.
    ensemble.train()
    assert not ensemble.generalist.training and not any(s.training for s in ensemble.specialists)
    assert not any(p.requires_grad for p in ensemble.parameters())
    state = {"state_dict": ensemble.state_dict()}
    ensemble.on_save_checkpoint(state)
    assert not any(k.startswith(("generalist.", "specialists.")) for k in state["state_dict"])
    for key in (
        "test/acc",
        "test/acc_generalist",
        "test/acc_average",
        "test/cond_acc",
        "test/cond_acc_generalist",
        "test/specialists_per_input",
        "test/cost",
        "test/acc_cover0",
        "test/acc_cover1",
    ):
        assert key in metrics, key
    report = ensemble.report
    assert report["count"] == 60 and report["cond_count"] == 40  # 4 of 6 classes are covered
    assert [row["cover"] for row in report["by_cover"]] == [0, 1]
    # Top-1 activation with disjoint groups: at most one specialist per input, and some inputs get one.
    assert 0.0 < report["specialists_per_input"] <= 1.0
    # Cost: the generalist plus each specialist's FLOPs (both specialists have the same net) per input.
    ratio = forward_flops(ensemble.specialists[0].net, (8,)) / forward_flops(ensemble.generalist.net, (8,))
    assert report["cost"] == pytest.approx(1.0 + report["specialists_per_input"] * ratio, rel=8 * EPS32)
    log_q = ensemble(torch.randn(3, 8))
    # fp32 probabilities summed over 6 classes: each within a few (4) roundings, relative.
    torch.testing.assert_close(log_q.exp().sum(-1), torch.ones(3), atol=4 * 6 * EPS32, rtol=0)

    # A specialist checkpoint for another group of another groups file.
    other = ClassGroups(6, d["source"].class_names, [[0, 1], [4, 5]]).save(tmp_path / "other.json")
    with pytest.raises(
        ValueError,
        match=r"is a specialist for group 1 with classes \[2, 3\], but group 1 of `groups_file` is \[4, 5\]",
    ):
        SpecialistEnsemble(str(d["dir"] / "generalist.ckpt"), [str(d["checkpoints"][1])], str(other))
    with pytest.raises(ValueError, match="are both for group 0"):
        SpecialistEnsemble(
            str(d["dir"] / "generalist.ckpt"), [str(d["checkpoints"][0])] * 2, str(d["groups"])
        )
    with pytest.raises(ValueError, match="is not a specialist checkpoint"):
        SpecialistEnsemble(
            str(d["dir"] / "generalist.ckpt"), [str(d["dir"] / "generalist.ckpt")], str(d["groups"])
        )
    ten = ClassGroups(10, [str(i) for i in range(10)], [[0, 1]]).save(tmp_path / "ten.json")
    with pytest.raises(ValueError, match="is for 10 classes, but the data/model has num_classes=6"):
        SpecialistEnsemble(str(d["dir"] / "generalist.ckpt"), [str(d["checkpoints"][0])], str(ten))


def test_ensemble_of_heterogeneous_specialists(trained, tmp_path):
    """Specialists of different architectures (the generalist's, started from it; a smaller and a deeper
    MLP, from scratch) combine: each runs its own network, the cost counts each one's FLOPs, and each
    reloads from its checkpoint alone."""
    d = trained
    nets = {1: partial(MLP, hidden=(4,)), 0: partial(MLP, hidden=(8, 8))}
    checkpoints = []
    for g, net in nets.items():
        L.seed_everything(g)
        data = SpecialistDataModule(
            d["source"], batch_size=32, eval_batch_size=64, val_size=40, groups_file=str(d["groups"]), group=g
        )
        specialist = SpecialistModule(
            net,
            6,
            (8,),
            classes=data.group_classes,
            group=g,
            groups_file=str(d["groups"]),
            generalist_ckpt=str(d["dir"] / "generalist.ckpt"),
            init_from="scratch",
        )
        trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0)
        trainer.fit(specialist, data)
        trainer.save_checkpoint(tmp_path / f"other{g}.ckpt")
        checkpoints.append(str(tmp_path / f"other{g}.ckpt"))
    for members in ([str(d["checkpoints"][0]), checkpoints[0]], checkpoints):
        ensemble = SpecialistEnsemble(str(d["dir"] / "generalist.ckpt"), members, str(d["groups"]))
        widths = [s.net.net[1].out_features for s in ensemble.specialists]
        x = torch.randn(40, 8)
        with torch.no_grad():
            pg, outputs, groups, active = ensemble.run_networks(x)
            combined = ensemble.combine(x)
            log_q = ensemble(x)
        assert [o.shape[1] for o in outputs] == [3, 3] and active.shape == (40, 2)
        # forward is the KL combination alone, the same prediction as `combine`'s.
        torch.testing.assert_close(log_q.exp(), combined["kl"], rtol=0, atol=4 * EPS32)
        torch.testing.assert_close(combined["generalist"], pg)
        # Where a specialist is inactive its rows are zeros (it did not run).
        for k, out in enumerate(outputs):
            assert torch.all(out[~active[:, k]] == 0)
        metrics = quiet_trainer(tmp_path).test(ensemble, d["data"], verbose=False)[0]
        report = ensemble.report
        flops = [forward_flops(s.net, (8,)) for s in ensemble.specialists]
        assert report["flops_specialists"] == flops and len(set(flops)) == 2, widths
        expected = (
            1.0
            + sum(r * f for r, f in zip(report["activation_rate"], flops, strict=True))
            / report["flops_generalist"]
        )
        # fp32 activation rates times integer FLOPs: a few roundings, relative.
        assert report["cost"] == pytest.approx(expected, rel=8 * EPS32)
        assert 0.0 <= metrics["test/acc"] <= 1.0
    # A specialist trained with `init_from: generalist` reloads without its generalist.
    (d["dir"] / "generalist.ckpt").rename(tmp_path / "moved.ckpt")
    assert load_specialist(d["checkpoints"][0]).group_classes == [0, 1]
    assert load_specialist(checkpoints[0]).net.net[1].out_features == 4


def test_specialist_bad_inputs(tmp_path):
    groups = ClassGroups(6, list("abcdef"), [[0, 1], [2, 3]]).save(tmp_path / "groups.json")
    ten_classes = Synthetic(
        num_superclasses=5, classes_per_superclass=2, dim=8, train_per_class=4, test_per_class=1
    )
    # The data owns the group: the groups file is read, and checked, by the DataModule.
    with pytest.raises(ValueError, match="is for 6 classes, but the data/model has num_classes=10"):
        SpecialistDataModule(ten_classes, groups_file=str(groups))
    with pytest.raises(ValueError, match=r"`group` must be in \[0, 2\) for this groups file, got 2"):
        SpecialistDataModule(tiny_source(), groups_file=str(groups), group=2)
    with pytest.raises(ValueError, match="either `groups_file` .* or `classes`"):
        SpecialistDataModule(tiny_source(), groups_file=str(groups), classes=[0])
    with pytest.raises(ValueError, match="either `groups_file` .* or `classes`"):
        SpecialistDataModule(tiny_source())
    with pytest.raises(ValueError, match="covers all 6 classes"):
        SpecialistDataModule(tiny_source(), classes=list(range(6)))
    assert SpecialistDataModule(tiny_source(), groups_file=str(groups), group=1).group_classes == [2, 3]
    with pytest.raises(ValueError, match="`classes` is missing: a specialist takes its group's classes"):
        SpecialistModule(NET, 6, (8,))
    with pytest.raises(ValueError, match=r"outside the label space \[0, 6\): \[6\]"):
        SpecialistModule(NET, 6, (8,), classes=[0, 6])
    with pytest.raises(ValueError, match="covers all 6 classes"):
        SpecialistModule(NET, 6, (8,), classes=list(range(6)))
    with pytest.raises(ValueError, match="needs the generalist"):
        SpecialistModule(NET, 6, (8,), classes=[0], soft_weight=0.5)
    with pytest.raises(FileNotFoundError, match="`generalist_ckpt`: no checkpoint file"):
        SpecialistModule(NET, 6, (8,), classes=[0], generalist_ckpt=str(tmp_path / "none.ckpt"))
    # The DataModule oversamples another group than the model is for.
    data = SpecialistDataModule(tiny_source(), batch_size=16, val_size=40, classes=[4])
    with pytest.raises(
        ValueError, match=r"oversamples classes \[4\], but this specialist is for group 0 = \[0\]"
    ):
        quiet_trainer(tmp_path, max_steps=1).fit(SpecialistModule(NET, 6, (8,), classes=[0]), data)
    # Evaluation checks the group too, and the model never relabels: its batches come from its data.
    natural = SpecialistDataModule(tiny_source(), batch_size=16, val_size=40, classes=[4], oversample=None)
    with pytest.raises(ValueError, match=r"relabels by classes \[4\], but this specialist is for group 0"):
        quiet_trainer(tmp_path).validate(SpecialistModule(NET, 6, (8,), classes=[0]), natural, verbose=False)
    plain = IndexedDataModule(tiny_source(), batch_size=16, val_size=40)
    with pytest.raises(KeyError, match="the batch has no 'specialist_target'"):
        quiet_trainer(tmp_path).validate(SpecialistModule(NET, 6, (8,), classes=[0]), plain, verbose=False)


LINKED = """
trainer: {accelerator: cpu, logger: false, enable_progress_bar: false, enable_model_summary: false}
model:
  class_path: kd_lightning.specialists.SpecialistModule
  init_args:
    net: {class_path: kd_lightning.models.MLP, init_args: {hidden: [16]}}
data:
  class_path: kd_lightning.datamodules.specialist.SpecialistDataModule
  init_args:
    source:
      class_path: kd_lightning.datamodules.Synthetic
      init_args: {num_superclasses: 3, classes_per_superclass: 2, dim: 8, train_per_class: 40, test_per_class: 10}
    groups_file: groups.json
    group: 1
"""


def test_kd_builds_a_specialist_of_its_own_architecture(tmp_path, monkeypatch):
    """In YAML (or on the command line) a specialist names its own network by class_path and starts from
    scratch; from the generalist it needs the generalist's shapes."""
    from kd_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    ClassGroups(6, list("abcdef"), [[0, 1], [5, 2]]).save(tmp_path / "groups.json")
    (tmp_path / "specialist.yaml").write_text(LINKED)
    own = [
        "--model.init_args.net=kd_lightning.models.MLP",
        "--model.init_args.net.init_args.hidden=[4, 4]",
        "--model.init_args.init_from=scratch",
    ]
    cli = main(["--config", "specialist.yaml", *own], run=False)
    model = cli.model
    assert [m.out_features for m in model.net.modules() if isinstance(m, nn.Linear)] == [4, 4, 3]
    assert model.hparams["init_from"] == "scratch"


def test_kd_links_the_datas_group_into_the_model(tmp_path, monkeypatch):
    """The data owns the group; `kd` links its classes, id and file into the model, like `num_classes`."""
    from kd_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    ClassGroups(6, list("abcdef"), [[0, 1], [5, 2]]).save(tmp_path / "groups.json")
    (tmp_path / "specialist.yaml").write_text(LINKED)
    cli = main(["--config", "specialist.yaml", f"--trainer.default_root_dir={tmp_path}"], run=False)
    model, data = cli.model, cli.datamodule
    assert data.group_classes == model.group_classes == [5, 2] and model.num_outputs == 3
    assert model.group == 1 and model.hparams["groups_file"] == "groups.json"
    # The group is the data's to set: the link wins over a value given to the model.
    cli = main(["--config", "specialist.yaml", "--model.init_args.classes=[0]"], run=False)
    assert cli.model.group_classes == [5, 2]
