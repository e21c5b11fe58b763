"""Intermediate-layer distillation: the pure losses against references written from the papers, the hooks,
the objectives' schedules, the adapters' ownership, mixed precision, DDP on CPU and the store refusal."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import TinySource
from torch import nn
from trainers import quiet_trainer

from kd_lightning.callbacks import SoftTargetCache
from kd_lightning.datamodules import IndexedDataModule
from kd_lightning.features import FeatureTaps, feature_shapes, resolve_layers
from kd_lightning.losses import attention_map, attention_transfer_loss, hint_loss, match_spatial
from kd_lightning.models import SmallCNN
from kd_lightning.modules import DistillationModule
from kd_lightning.objectives import AttentionTransfer, FitNetsHints, HintonKD
from kd_lightning.resnets import resnet8x4, resnet32x4, wrn_16_2, wrn_40_2

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 8, 8)
EPS32 = torch.finfo(torch.float32).eps
# SmallCNN's max-pools: the outputs of its first and second stages.
STAGES = ["features.6", "features.13"]


# ---------------------------------------------------------------------------------------------
# Pure losses, against float64 references written from the papers' formulas


def test_hint_loss_is_the_papers_half_squared_norm_up_to_its_constant():
    """Romero et al.: L_HT = 1/2 ||u - r(v)||^2 per sample; hint_loss is its batch mean times 2 / (C H W)."""
    g = torch.Generator().manual_seed(0)
    r, u = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    r64, u64 = r.double(), u.double()
    per_sample = [0.5 * sum(float(d) ** 2 for d in (u64[n] - r64[n]).flatten()) for n in range(3)]
    reference = sum(per_sample) / 3 * 2 / (4 * 5 * 5)
    # A mean of 300 fp32 squares: relative error <= ~300 eps in the worst case, far less in practice.
    assert float(hint_loss(r, u)) == pytest.approx(reference, rel=300 * EPS32)
    assert float(hint_loss(u, u)) == 0.0
    with pytest.raises(ValueError, match=r"same shape, got \(3, 4, 5, 5\) and \(3, 2, 5, 5\)"):
        hint_loss(r, u[:, :2])


def attention_reference(feature: torch.Tensor, p: float = 2.0) -> list[list[float]]:
    """Zagoruyko & Komodakis: F_sum^p(A) = sum_c |A_c|^p, vectorised, divided by its L2 norm (float64)."""
    n, c = feature.shape[:2]
    out = []
    for i in range(n):
        q = [
            sum(abs(float(feature[i, k].flatten()[j])) ** p for k in range(c))
            for j in range(feature[i, 0].numel())
        ]
        norm = math.sqrt(sum(v * v for v in q))
        out.append([v / norm for v in q])
    return out


def test_attention_map_is_the_papers_normalised_channel_sum():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(2, 3, 4, 4, generator=g)
    reference = torch.tensor(attention_reference(f.double()), dtype=torch.float64)
    q = attention_map(f)
    assert q.dtype == torch.float32 and q.shape == (2, 16)
    torch.testing.assert_close(q.double(), reference, atol=16 * EPS32, rtol=0)
    # p = 1 and p = 4 as well
    for p in (1.0, 4.0):
        reference = torch.tensor(attention_reference(f.double(), p), dtype=torch.float64)
        torch.testing.assert_close(attention_map(f, p).double(), reference, atol=16 * EPS32, rtol=0)


def test_attention_transfer_loss_matches_the_reference_over_pairs_and_sizes():
    """beta/2 * sum_j mean_{n,i} (Q_S/||Q_S|| - Q_T/||Q_T||)^2, maps of different sizes pooled to the smaller."""
    g = torch.Generator().manual_seed(2)
    s1, t1 = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    s2, t2 = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 6, 2, 2, generator=g)
    beta = 1000.0
    # the student's 4x4 map of pair 2 is average-pooled over 2x2 blocks to the teacher's 2x2
    s2_pooled = s2.double().reshape(2, 3, 2, 2, 2, 2).mean((3, 5))
    reference = 0.0
    for s, t in ((s1.double(), t1.double()), (s2_pooled, t2.double())):
        qs, qt = attention_reference(s), attention_reference(t)
        squares = [
            (a - b) ** 2
            for row_s, row_t in zip(qs, qt, strict=True)
            for a, b in zip(row_s, row_t, strict=True)
        ]
        reference += sum(squares) / len(squares)
    reference *= beta / 2
    loss = attention_transfer_loss([s1, s2], [t1, t2], beta=beta)
    # unit-norm maps: each squared difference <= 4, errors ~eps per entry, times beta / 2
    assert float(loss) == pytest.approx(reference, abs=beta / 2 * 2 * 64 * EPS32)
    # invariant to a positive scale of either feature; zero against itself
    assert float(attention_transfer_loss([s1], [3.0 * s1])) == pytest.approx(0.0, abs=beta * 16 * EPS32)
    with pytest.raises(ValueError, match="one teacher feature per student feature"):
        attention_transfer_loss([s1, s2], [t1])


def test_match_spatial_pools_the_larger_map_and_checks_shapes():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    s, t = match_spatial(x, torch.zeros(1, 2, 2, 2))
    assert s.tolist() == [[[[2.5, 4.5], [10.5, 12.5]]]] and t.shape == (1, 2, 2, 2)
    same = torch.zeros(2, 3, 4, 4)
    assert match_spatial(same, same)[0] is same
    with pytest.raises(ValueError, match="same batch size"):
        match_spatial(torch.zeros(2, 1, 4, 4), torch.zeros(3, 1, 4, 4))
    with pytest.raises(ValueError, match=r"must be \(N, C, H, W\) maps"):
        match_spatial(torch.zeros(2, 1, 4), torch.zeros(2, 1, 2))


def test_losses_upcast_half_precision_features_to_fp32():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    for loss in (hint_loss, lambda a, b: attention_transfer_loss([a], [b])):
        low = loss(s.bfloat16(), t.bfloat16())
        assert low.dtype == torch.float32
        # the inputs were rounded to bf16 (relative 2^-8); the loss, a smooth function of them, moves about as much
        assert float(low) == pytest.approx(float(loss(s, t)), rel=8 * torch.finfo(torch.bfloat16).eps)


# ---------------------------------------------------------------------------------------------
# Hooks


def test_capture_registers_hooks_only_during_the_block_and_removes_them_on_errors():
    net = SmallCNN(SHAPE, 4, channels=(4, 8), head=16, channels_last=False)
    taps = FeatureTaps.of(net, STAGES, "layers")
    hooks = lambda: sum(len(m._forward_hooks) for m in net.modules())  # noqa: E731
    with taps.capture() as features:
        assert hooks() == 2 and features == []
        net(torch.zeros(3, *SHAPE))
    assert hooks() == 0
    assert [tuple(f.shape) for f in features] == [(3, 4, 4, 4), (3, 8, 2, 2)]
    with pytest.raises(ZeroDivisionError), taps.capture():
        net(torch.zeros(3, *SHAPE))
        _ = 1 / 0
    assert hooks() == 0
    # outside a capture the network runs without hooks
    net(torch.zeros(1, *SHAPE))
    assert feature_shapes(net, taps, SHAPE) == [(4, 4, 4), (8, 2, 2)] and net.training


def test_wrong_layer_name_lists_the_available_names():
    net = SmallCNN(SHAPE, 4, channels=(4, 8), head=16)
    with pytest.raises(ValueError) as error:
        resolve_layers(net, ["features.6", "layer3"], "student_layers")
    message = str(error.value)
    assert (
        "`student_layers`: SmallCNN has no module named 'layer3'; available: features, features.0," in message
    )
    assert "classifier.5" in message
    # at the module: the objective's argument is named
    with pytest.raises(
        ValueError, match=r"`objective.teacher_layers`: SmallCNN has no module named 'stages.1'"
    ):
        make_module(FitNetsHints("features.6", "stages.1"))
    with pytest.raises(ValueError, match="must name the same number of layers"):
        FitNetsHints(["features.6"], ["features.6", "features.13"])


def test_a_layer_off_the_forward_path_is_an_error():
    net = nn.ModuleDict({"used": nn.Linear(2, 2), "unused": nn.Linear(2, 2)})
    taps = FeatureTaps.of(net, ["used", "unused"], "layers")
    with pytest.raises(RuntimeError, match=r"layers \['unused'\] did not run"), taps.capture():
        net["used"](torch.zeros(1, 2))


# ---------------------------------------------------------------------------------------------
# Objectives and the module


def make_module(objective, seed: int = 0, **kwargs) -> DistillationModule:
    torch.manual_seed(seed)
    teacher = SmallCNN(SHAPE, 4, channels=(8, 16), head=16, dropout=0.0, channels_last=False)
    return DistillationModule(
        partial(SmallCNN, channels=(4, 8), head=16, dropout=0.0, channels_last=False),
        4,
        SHAPE,
        teacher=teacher,
        objective=objective,
        optimizer=partial(torch.optim.AdamW, lr=0.01),
        **kwargs,
    )


def make_dm() -> IndexedDataModule:
    return IndexedDataModule(TinySource(4), batch_size=32, eval_batch_size=64, val_size=64)


def batch(n: int = 8) -> dict:
    return {"input": torch.randn(n, *SHAPE), "target": torch.randint(0, 4, (n,)), "index": torch.arange(n)}


def test_regressors_belong_to_the_student_optimizer_and_checkpoint(tmp_path):
    module = make_module(FitNetsHints(STAGES, STAGES))
    assert [type(a[0]).__name__ for a in module.adapters] == ["Conv2d", "Conv2d"]
    assert [(a[0].in_channels, a[0].out_channels) for a in module.adapters] == [(4, 8), (8, 16)]
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=1, num_sanity_val_steps=0)
    before = [p.detach().clone() for p in module.adapters.parameters()]
    trainer.fit(module, make_dm())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    adapters = list(module.adapters.parameters())
    assert all(id(p) in optimized for p in adapters)
    assert not any(id(p) in optimized for p in module.teacher.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(adapters, before, strict=True))  # the regressors trained
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    state = torch.load(tmp_path / "s.ckpt", weights_only=False)["state_dict"]
    assert {k for k in state if k.startswith("adapters.")} == {
        f"adapters.{k}" for k in module.adapters.state_dict()
    }
    assert not [k for k in state if k.startswith("teacher.")]
    # a fresh module (same teacher) reloads every key strictly, adapters included
    fresh = make_module(FitNetsHints(STAGES, STAGES), seed=1)
    fresh.on_load_checkpoint(checkpoint := {"state_dict": dict(state)})
    fresh.load_state_dict(checkpoint["state_dict"])
    torch.testing.assert_close(fresh.adapters.state_dict(), module.adapters.state_dict(), rtol=0, atol=0)
    # rebuilt without a teacher (as a teacher itself), the adapters' weights are dropped, not refused
    alone = DistillationModule(
        partial(SmallCNN, channels=(4, 8), head=16), 4, SHAPE, objective=FitNetsHints(STAGES, STAGES)
    )
    alone.on_load_checkpoint(checkpoint := {"state_dict": dict(state)})
    alone.load_state_dict(checkpoint["state_dict"])
    assert len(alone.adapters) == 0


def test_fitnets_stages_weight_the_terms_by_epoch():
    objective = FitNetsHints(
        "features.6", "features.6", hint_weight=2.0, feature_only_epochs=2, keep_hint=False
    )
    module = make_module(objective)
    b = batch()
    logits, teacher_logits, features = module._forward_with_teacher(b)
    features = [(s, t) for s, t in features]
    first = objective(logits, teacher_logits, b["target"], 1, features)
    second = objective(logits, teacher_logits, b["target"], 2, features)
    kd = HintonKD(4.0, 0.1)(logits, teacher_logits, b["target"])
    assert float(first["loss"]) == pytest.approx(2.0 * float(first["hint"]), rel=4 * EPS32)
    assert float(second["loss"]) == pytest.approx(float(kd["loss"]), rel=4 * EPS32)
    # the regressor is still in the graph in the second stage (DDP needs every parameter used), with zero gradient
    second["loss"].backward()
    grads = [p.grad for p in module.adapters.parameters()]
    assert all(g is not None and not g.any() for g in grads)
    joint = FitNetsHints("features.6", "features.6", hint_weight=3.0)(
        logits, teacher_logits, b["target"], 5, features
    )
    assert float(joint["loss"]) == pytest.approx(
        float(kd["loss"]) + 3.0 * float(joint["hint"]), rel=4 * EPS32
    )
    with pytest.raises(ValueError, match="never uses the hint"):
        FitNetsHints("a", "b", keep_hint=False)


def test_attention_transfer_adds_beta_half_the_map_distance_and_no_parameters():
    objective = AttentionTransfer(STAGES, STAGES, beta=10.0)
    module = make_module(objective)
    assert not list(module.adapters.parameters())
    b = batch()
    logits, teacher_logits, features = module._forward_with_teacher(b)
    out = objective(logits, teacher_logits, b["target"], 0, features)
    expected = attention_transfer_loss([s for s, _ in features], [t for _, t in features], beta=10.0)
    assert float(out["at"]) == pytest.approx(float(expected), rel=4 * EPS32)
    # hard_weight=1 (the default): cross-entropy plus the attention term
    assert float(out["loss"]) == pytest.approx(float(out["hard"]) + float(out["at"]), rel=4 * EPS32)
    with pytest.raises(ValueError, match="compares 2 layer pairs"):
        objective(logits, teacher_logits, b["target"], 0, features[:1])


def test_bf16_mixed_step_computes_the_feature_loss_in_fp32(tmp_path):
    seen: dict = {}

    class Recorded(FitNetsHints):
        def __call__(self, student_logits, teacher_logits, target, epoch=0, features=()):
            out = super().__call__(student_logits, teacher_logits, target, epoch, features)
            seen["feature_dtypes"] = {str(x.dtype) for pair in features for x in pair}
            seen["loss_dtypes"] = {v.dtype for v in out.values()}
            return out

    module = make_module(Recorded(STAGES, STAGES))
    trainer = quiet_trainer(
        tmp_path, max_steps=3, limit_val_batches=1, num_sanity_val_steps=0, precision="bf16-mixed"
    )
    trainer.fit(module, make_dm())
    assert seen["feature_dtypes"] == {"torch.bfloat16"}  # both networks and the regressor ran under autocast
    assert seen["loss_dtypes"] == {torch.float32}
    assert all(math.isfinite(float(trainer.callback_metrics[k])) for k in ("train/hint", "train/loss"))


def test_a_soft_target_store_is_refused_with_the_reason(tmp_path):
    module = make_module(AttentionTransfer(STAGES, STAGES))
    with pytest.raises(ValueError, match="SoftTargetCache cannot serve DistillationModule.*computed live"):
        SoftTargetCache(path=str(tmp_path / "store")).setup(quiet_trainer(tmp_path), module, "fit")
    b = {**batch(), "teacher_logits": torch.zeros(8, 4)}
    with pytest.raises(RuntimeError, match="came from a soft-target store.*computed live"):
        module.training_step(b, 0)
    assert make_module(HintonKD()).live_teacher_reason() is None


# ---------------------------------------------------------------------------------------------
# The shipped configs' layer names


@pytest.mark.parametrize(
    ("config", "student", "teacher"),
    [
        ("cifar100/student_resnet8x4_hints.yaml", resnet8x4, resnet32x4),
        ("cifar100/student_resnet8x4_at.yaml", resnet8x4, resnet32x4),
        ("cifar100/student_wrn_16_2_hints.yaml", wrn_16_2, wrn_40_2),
        ("cifar100/student_wrn_16_2_at.yaml", wrn_16_2, wrn_40_2),
        ("fashion_mnist/features_hints.yaml", None, None),
        ("fashion_mnist/features_at.yaml", None, None),
    ],
)
def test_shipped_feature_configs_name_existing_layers(config, student, teacher):
    init = yaml.safe_load((ROOT / "configs" / config).read_text())["model"]["init_args"]
    objective = init["objective"]["init_args"]
    if student is None:  # the Fashion-MNIST pair: SmallCNNs as the configs build them
        student = partial(SmallCNN, **init["student"]["init_args"])
        teacher_yaml = yaml.safe_load((ROOT / "configs/fashion_mnist/features_teacher.yaml").read_text())
        teacher = partial(SmallCNN, **teacher_yaml["model"]["init_args"]["net"]["init_args"])
        shape, classes = (1, 28, 28), 10
    else:
        shape, classes = (3, 32, 32), 100
    resolve_layers(student(shape, classes), objective["student_layers"], "student_layers")
    resolve_layers(teacher(shape, classes), objective["teacher_layers"], "teacher_layers")


# ---------------------------------------------------------------------------------------------
# Two processes (ddp_spawn, gloo)


class Report(L.Callback):
    """Each rank writes what it ends with to ``rank<r>.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module):
        optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        facts = {
            "world_size": trainer.world_size,
            "adapters": [float(p.detach().double().sum()) for p in pl_module.adapters.parameters()],
            "adapters_optimized": all(id(p) in optimized for p in pl_module.adapters.parameters()),
            "teacher_optimized": any(id(p) in optimized for p in pl_module.teacher.parameters()),
            "hint": float(trainer.callback_metrics["train/hint"]),
            "hooks": sum(len(m._forward_hooks) for m in pl_module.modules()),
        }
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(facts))


def distil_ddp(path: Path) -> None:
    """FitNets (joint loss) with 2 processes under bf16-mixed."""
    L.seed_everything(5)
    trainer = quiet_trainer(
        path,
        devices=2,
        strategy="ddp_spawn",
        precision="bf16-mixed",
        max_epochs=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[Report(path)],
    )
    trainer.fit(make_module(FitNetsHints(STAGES, STAGES)), make_dm())


@pytest.mark.slow  # two spawned processes import torch and Lightning: about 20 s on 2 busy cores
def test_two_process_feature_distillation(tmp_path):
    distil_ddp(tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for r in ranks:
        assert r["adapters_optimized"] and not r["teacher_optimized"]
        assert math.isfinite(r["hint"]) and r["hooks"] == 0
    # DDP all-reduces the regressors' gradients: both ranks hold the same weights
    assert ranks[0]["adapters"] == pytest.approx(ranks[1]["adapters"], rel=1e-6)


def test_teacher_layers_are_named_within_a_checkpointed_teachers_network():
    """A teacher loaded from a checkpoint is a ClassifierModule: its layers are named within its `net`."""
    from kd_lightning.modules import ClassifierModule

    teacher = ClassifierModule(partial(SmallCNN, channels=(8, 16), head=16, channels_last=False), 4, SHAPE)
    module = make_module(AttentionTransfer(STAGES, STAGES))
    module.set_teacher(teacher)
    logits, teacher_logits, features = module._forward_with_teacher(batch())
    assert [tuple(t.shape) for _, t in features] == [(8, 8, 4, 4), (8, 16, 2, 2)]
