"""Ensembles: combination rules against hand computation, one-member identity, FLOPs, teacher use, errors."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kd_lightning.callbacks import SoftTargetCache
from kd_lightning.costs import forward_flops, measure_latency
from kd_lightning.datamodules import FashionMNIST
from kd_lightning.ensemble import (
    RULES,
    Ensemble,
    EnsembleModule,
    classification_metrics,
    combine_logits,
)
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.modules import ClassifierModule, DistillationModule
from kd_lightning.store import SoftTargetStore
from kd_lightning.workflows.members import member_overrides, train_members

ROOT = Path(__file__).resolve().parents[1]
EPS32 = torch.finfo(torch.float32).eps


# --- the three rules --------------------------------------------------------------------------------


def test_rules_by_hand_two_members_two_classes():
    z = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])  # member 1: (2, 0), member 2: (0, 0)
    e2 = math.exp(2.0)
    p1 = [e2 / (e2 + 1), 1 / (e2 + 1)]
    mean_probs = [(p1[0] + 0.5) / 2, (p1[1] + 0.5) / 2]
    mean_logits = [math.e / (math.e + 1), 1 / (math.e + 1)]  # softmax of (1, 0)
    g = [math.sqrt(p1[0] * 0.5), math.sqrt(p1[1] * 0.5)]
    geometric = [g[0] / sum(g), g[1] / sum(g)]
    # Logits of size <= 2 over 2 classes in fp32: a few (4) roundings of max|z| + log C per probability.
    tol = 4 * EPS32 * (2.0 + math.log(2))
    for rule, expected in [
        ("mean_probs", mean_probs),
        ("mean_logits", mean_logits),
        ("geometric", geometric),
    ]:
        got = combine_logits(z, rule).exp()[0].tolist()
        assert got == pytest.approx(expected, rel=0, abs=tol), rule


def test_rules_against_numpy_reference():
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3.0, size=(3, 5, 7))
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    ref = {
        "mean_probs": p.mean(0),
        "mean_logits": np.exp(z.mean(0)) / np.exp(z.mean(0)).sum(-1, keepdims=True),
        "geometric": np.prod(p, 0) ** (1 / 3) / (np.prod(p, 0) ** (1 / 3)).sum(-1, keepdims=True),
    }
    # A probability's relative error is its log's absolute error: a few (8) roundings of max|z| + log C
    # (log-softmax, mean or log-sum-exp over members, exp), in fp32 here and in float64 for numpy.
    scale = np.abs(z).max() + math.log(z.shape[-1])
    for rule in RULES:
        got = combine_logits(torch.tensor(z, dtype=torch.float32), rule).exp().numpy()
        np.testing.assert_allclose(got, ref[rule], rtol=8 * EPS32 * scale, atol=0)
        np.testing.assert_allclose(got.sum(-1), 1.0, rtol=8 * EPS32 * scale + z.shape[-1] * EPS32, atol=0)
    # The renormalised geometric mean of softmax members is the softmax of the mean logits.
    np.testing.assert_allclose(
        ref["geometric"], ref["mean_logits"], rtol=8 * np.finfo(np.float64).eps * scale
    )


def test_mean_probs_does_not_underflow():
    z = torch.tensor([[[0.0, -200.0]], [[0.0, -300.0]]])
    out = combine_logits(z, "mean_probs")
    # A few (4) fp32 roundings of the result's size (about 200).
    assert torch.isfinite(out).all()
    assert out[0, 1] == pytest.approx(-200.0 - math.log(2), rel=0, abs=4 * EPS32 * 201)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_one_member_ensemble_equals_the_member(rule):
    torch.manual_seed(0)
    member = MLP((1, 8, 8), 4, hidden=(16,))
    x = torch.randn(10, 1, 8, 8)
    ens = Ensemble(members=[member], rule=rule, input_shape=(1, 8, 8))
    torch.testing.assert_close(ens(x), torch.log_softmax(member(x), -1))


def test_one_member_ensemble_module_scores_like_the_member(tmp_path, tiny_dm, trainer_factory):
    ckpt = _tiny_member(tmp_path, tiny_dm, trainer_factory, seed=0)
    member = ClassifierModule.load_from_checkpoint(ckpt, weights_only=False)
    alone = trainer_factory().test(member, datamodule=tiny_dm(), verbose=False)[0]
    ens = EnsembleModule(4, (1, 8, 8), checkpoints=[str(ckpt)])
    scored = trainer_factory().test(ens, datamodule=tiny_dm(), verbose=False)[0]
    assert scored["test/acc"] == pytest.approx(alone["test/acc"])
    assert scored["test/member_acc_0"] == pytest.approx(alone["test/acc"])
    # One member: the rule returns its log-softmax, so both NLLs are the same fp32 sums, a few roundings apart.
    assert scored["test/loss"] == pytest.approx(alone["test/loss"], rel=4 * EPS32)
    assert scored["test/flops_per_example"] == forward_flops(member.net, (1, 8, 8))


def test_classification_metrics_by_hand():
    log_probs = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]))
    target = torch.tensor([0, 1, 1])
    m = classification_metrics(log_probs, target, n_bins=10)
    assert m["acc"] == pytest.approx(2 / 3)
    # fp32 probabilities <= 1 and their logs: each term a few (4) roundings off; their mean as well.
    nll = -(math.log(0.9) + math.log(0.4) + math.log(0.8)) / 3
    assert m["nll"] == pytest.approx(nll, rel=0, abs=4 * EPS32 * (1 + abs(math.log(0.4))))
    # one sample per bin: |confidence - correct| averaged: (0.1 + 0.6 + 0.2) / 3
    assert m["ece"] == pytest.approx((0.1 + 0.6 + 0.2) / 3, rel=0, abs=4 * EPS32)


# --- cost ---------------------------------------------------------------------------------------------


def test_flops_of_known_layer_stacks():
    h = 32
    assert forward_flops(MLP((1, 28, 28), 10, hidden=(h, h)), (1, 28, 28)) == 2 * (784 * h + h * h + h * 10)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    assert forward_flops(conv, (3, 6, 6)) == 2 * (3 * 8 * 9 * 6 * 6) + 2 * (8 * 6 * 6 * 5)
    cnn = SmallCNN((1, 8, 8), 4, channels=(4,), head=8)
    analytic = 2 * (1 * 4 * 9 * 64 + 4 * 4 * 9 * 64) + 2 * (4 * 4 * 4 * 8 + 8 * 4)
    assert forward_flops(cnn, (1, 8, 8)) == analytic


def test_ensemble_flops_add_up_and_latency_is_measured():
    members = [MLP((1, 8, 8), 4, hidden=(16,)), MLP((1, 8, 8), 4, hidden=(32,))]
    ens = Ensemble(members=members, input_shape=(1, 8, 8))
    assert forward_flops(ens, (1, 8, 8)) == sum(forward_flops(m, (1, 8, 8)) for m in members)
    assert 0 < measure_latency(ens, (1, 8, 8), batch_size=8, repeats=3, warmup=1) < 1.0
    with pytest.raises(ValueError, match="`batch_size`"):
        measure_latency(ens, (1, 8, 8), batch_size=0)


# --- as a teacher -------------------------------------------------------------------------------------


def _tiny_member(tmp_path, tiny_dm, trainer_factory, seed: int) -> Path:
    torch.manual_seed(seed)
    module = ClassifierModule(partial(MLP, hidden=(16,)), 4, (1, 8, 8))
    trainer = trainer_factory(max_epochs=2)
    trainer.fit(module, datamodule=tiny_dm())
    path = tmp_path / f"member_{seed}.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_ensemble_teacher_distils_a_tiny_student_live_and_cached(tmp_path, tiny_dm, trainer_factory):
    ckpts = [str(_tiny_member(tmp_path, tiny_dm, trainer_factory, s)) for s in (0, 1)]
    teacher = Ensemble(checkpoints=ckpts)
    before = [p.clone() for p in teacher.parameters()]
    student = DistillationModule(partial(MLP, hidden=(16,)), 4, (1, 8, 8), teacher=teacher)
    trainer = trainer_factory(max_epochs=2)
    trainer.fit(student, datamodule=tiny_dm())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    # The logged agreement is the final student's top-1 agreement with the ensemble on the validation split.
    dm = tiny_dm()
    dm.setup("fit")
    val = next(iter(dm.val_dataloader()))  # all 64 validation samples
    with torch.no_grad():
        agree = (student.eval()(val["input"]).argmax(-1) == teacher(val["input"]).argmax(-1)).float().mean()
    assert float(trainer.callback_metrics["val/agreement"]) == pytest.approx(float(agree), abs=0.5 / 64)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    assert not any(p.requires_grad for p in student.teacher.parameters())

    # Through the soft-target cache: the store holds the ensemble's log-probabilities.
    cache = SoftTargetCache(path=str(tmp_path / "store"), splits=["train"])
    cached = DistillationModule(partial(MLP, hidden=(16,)), 4, (1, 8, 8), teacher=Ensemble(checkpoints=ckpts))
    trainer = trainer_factory(max_epochs=1, callbacks=[cache])
    trainer.fit(cached, datamodule=tiny_dm())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    dm = tiny_dm()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        expected = teacher(batch["input"])
    stored = SoftTargetStore.open(tmp_path / "store" / "train").lookup(batch["index"])
    # float16 store: rounding to nearest is within eps16 / 2 relative; the teacher's fp32 pass in the
    # cache and here may differ by a few (8) fp32 roundings of the log-probabilities' size.
    rtol, atol = torch.finfo(torch.float16).eps, 8 * EPS32 * float(expected.abs().max())
    torch.testing.assert_close(stored, expected, rtol=rtol, atol=atol)


# --- bad input ----------------------------------------------------------------------------------------


def test_bad_members_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="`members` is empty"):
        Ensemble(members=[], input_shape=(4,))
    with pytest.raises(ValueError, match=r"number of classes \(member 0: 3, member 1: 5\)"):
        Ensemble(members=[nn.Linear(4, 3), nn.Linear(4, 5)], input_shape=(4,))
    a = ClassifierModule(partial(MLP, hidden=(8,)), 3, (1, 8, 8))
    b = ClassifierModule(partial(MLP, hidden=(8,)), 3, (1, 4, 4))
    with pytest.raises(ValueError, match=r"input shape \(0: \(1, 8, 8\), 1: \(1, 4, 4\)\)"):
        Ensemble(members=[a, b])
    with pytest.raises(
        ValueError, match=r"`rule` must be one of \['geometric', 'mean_logits', 'mean_probs'\]"
    ):
        Ensemble(members=[a], rule="median")
    with pytest.raises(ValueError, match="`rule` must be one of"):
        combine_logits(torch.zeros(1, 2, 3), "vote")
    with pytest.raises(ValueError, match="either `checkpoints` or `members`"):
        Ensemble()
    with pytest.raises(FileNotFoundError, match=r"`checkpoints\[0\]`: no checkpoint file"):
        Ensemble(checkpoints=[str(tmp_path / "missing.ckpt")])


def test_members_without_an_input_shape_take_the_given_one():
    """A member that does not record its input shape (or records None) defers to the others / the argument."""
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    unknown = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    unknown.input_shape = None
    recorded = ClassifierModule(partial(MLP, hidden=(8,)), 3, (1, 8, 8))
    assert Ensemble(members=[plain, unknown, recorded]).input_shape == (1, 8, 8)
    assert Ensemble(members=[plain, unknown], input_shape=(64,)).input_shape == (64,)
    with pytest.raises(ValueError, match="`input_shape` is needed"):
        Ensemble(members=[plain, unknown])


def test_ensemble_module_checks_the_data_classes(tmp_path, tiny_dm, trainer_factory):
    ckpt = _tiny_member(tmp_path, tiny_dm, trainer_factory, seed=0)
    with pytest.raises(ValueError, match="output 4 classes but `num_classes` \\(from the data\\) is 10"):
        EnsembleModule(10, (1, 8, 8), checkpoints=[str(ckpt)])


# --- training members ---------------------------------------------------------------------------------


def test_member_overrides():
    args = member_overrides(
        2, "out", seed_base=10, vary=("model.init_args.net.init_args.hidden", ["[8]", "[16]", "[32]"])
    )
    assert "--seed_everything=12" in args and "--trainer.default_root_dir=out/member_2" in args
    assert args[-1] == "--model.init_args.net.init_args.hidden=[32]"
    with pytest.raises(ValueError, match="none for member 3"):
        member_overrides(3, "out", vary=("k", ["a", "b", "c"]))


@pytest.mark.skipif(not FashionMNIST().available(), reason="Fashion-MNIST files missing: run `make data`")
def test_train_members_differ_by_seed_and_are_reused(tmp_path):
    tiny = [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
        "--model.init_args.net.init_args.hidden=[16]",
    ]
    config = ROOT / "configs/fashion_mnist/member.yaml"
    first = train_members(config, range(2), "runs/m", tmp_path, overrides=tiny)
    assert [Path(r.checkpoint) for r in first] == [
        tmp_path / f"runs/m/member_{k}/seed{k}/checkpoints/final.ckpt" for k in range(2)
    ]
    w = [torch.load(r.checkpoint, weights_only=False)["state_dict"]["net.net.1.weight"] for r in first]
    assert not torch.equal(w[0], w[1])  # seeds 0 and 1
    again = train_members(config, [1], "runs/m", tmp_path, overrides=tiny)
    assert again[0].reused and again[0].checkpoint == first[1].checkpoint


@pytest.mark.skipif(not FashionMNIST().available(), reason="Fashion-MNIST files missing: run `make data`")
def test_each_student_seed_of_distill_ensemble_gets_its_own_checkpoint(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from kd_lightning.cli import main
    from kd_lightning.workflows.members import seed_overrides

    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "configs/fashion_mnist/distill_ensemble.yaml")
    cli = main(["--config", config, "--model.init_args.teacher=null", *seed_overrides(7, "out")], run=False)
    checkpoint = next(c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint))
    assert Path(checkpoint.dirpath) == tmp_path / "out/seed7/checkpoints"
    assert any(isinstance(c, SoftTargetCache) for c in cli.trainer.callbacks)


def test_ensemble_module_returns_the_eval_output_and_holds_its_members_frozen(
    tmp_path, tiny_dm, trainer_factory
):
    ckpts = [str(_tiny_member(tmp_path, tiny_dm, trainer_factory, s)) for s in (0, 1)]
    ens = EnsembleModule(4, (1, 8, 8), checkpoints=ckpts).train()
    assert not any(m.training for m in ens.net.modules()) and not any(
        p.requires_grad for p in ens.parameters()
    )
    dm = tiny_dm()
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    out = ens.validation_step(batch, 0)
    assert set(out) == {"logits", "target"} and torch.equal(out["target"], batch["target"])
    with torch.no_grad():
        torch.testing.assert_close(
            out["logits"], ens.net(batch["input"]), rtol=0, atol=0
        )  # log-probabilities
    # The members' weights stay in their own files, not in the ensemble's checkpoint; it reloads from them.
    trainer = trainer_factory()
    trainer.test(ens, datamodule=dm, verbose=False)
    trainer.save_checkpoint(tmp_path / "ensemble.ckpt")
    state = torch.load(tmp_path / "ensemble.ckpt", weights_only=False)["state_dict"]
    assert not any(k.startswith("net.") for k in state), sorted(state)
    again = EnsembleModule.load_from_checkpoint(tmp_path / "ensemble.ckpt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(again.net(batch["input"]), ens.net(batch["input"]), rtol=0, atol=0)
