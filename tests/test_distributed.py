"""Teacher placement, precision and DDP on CPU (gloo): real Trainers, two processes where it matters.

DDP inside pytest: ``strategy="ddp"`` would relaunch pytest itself for rank 1, so in-process runs use
``ddp_spawn`` with module-level functions, and ``ddp`` is exercised through the ``kd`` command in a
subprocess (see docs/architecture.md, pitfalls).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import TinySource
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from trainers import ReleaseProcessGroup, quiet_trainer

from kd_lightning.cache.protocols import TeacherCarrier
from kd_lightning.callbacks import TeacherPlacement
from kd_lightning.callbacks.teacher_placement import DDPIgnoring, PlacedTeacher
from kd_lightning.datamodules import IndexedDataModule, Synthetic
from kd_lightning.losses import soft_target_loss
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.modules import ClassifierModule, DistillationModule
from kd_lightning.objectives import HintonKD

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 8, 8)
EPS32 = torch.finfo(torch.float32).eps


def make_module(seed: int = 0) -> DistillationModule:
    torch.manual_seed(seed)
    teacher = SmallCNN(SHAPE, 4, channels=(4, 8), head=16, dropout=0.3, channels_last=False)
    # An untrained teacher: the hard labels (weight 0.5) carry the planted rule, a high lr learns it fast.
    return DistillationModule(
        partial(MLP, hidden=(16,)),
        4,
        SHAPE,
        teacher=teacher,
        objective=HintonKD(temperature=4.0, hard_weight=0.5),
        optimizer=partial(torch.optim.AdamW, lr=0.01),
    )


def make_dm(batch_size: int = 32) -> IndexedDataModule:
    return IndexedDataModule(TinySource(4), batch_size=batch_size, eval_batch_size=64, val_size=64)


class Probe(L.Callback):
    """Records, on every rank, what the acceptance criteria are about; writes ``rank<r>.json``."""

    def __init__(self, out: Path | None = None) -> None:
        self.out = out
        self.train_losses: list[float] = []
        self.teacher_grads: list[str] = []
        self.facts: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_losses.append(float(outputs["loss"]))

    def on_after_backward(self, trainer, pl_module):
        self.teacher_grads += [n for n, p in pl_module.teacher.named_parameters() if p.grad is not None]

    def on_train_end(self, trainer, pl_module):
        optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        ddp = trainer.strategy.model
        self.facts = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "val_acc": float(trainer.callback_metrics.get("val/acc", math.nan)),
            "val_loss": float(trainer.callback_metrics.get("val/loss", math.nan)),
            "train_losses": self.train_losses,
            "teacher_grads": self.teacher_grads,
            "teacher_in_optimizer": sum(id(p) in optimized for p in pl_module.teacher.parameters()),
            "student_in_optimizer": sum(id(p) in optimized for p in pl_module.student.parameters()),
            "student_params": sum(1 for _ in pl_module.student.parameters()),
            "teacher_training": pl_module.teacher.training,
            "teacher_dtype": str(next(pl_module.teacher.parameters()).dtype),
            "teacher_placed": isinstance(pl_module.teacher, PlacedTeacher),
            "teacher_device": str(next(pl_module.teacher.parameters()).device),
            "student_device": str(pl_module.device),
            "ddp_ignored": sorted(getattr(ddp, "parameters_to_ignore", ())),
            "ddp_synced": [n for n, p in ddp.named_parameters() if p.requires_grad]
            if isinstance(ddp, nn.parallel.DistributedDataParallel)
            else [],
            "teacher_keys": sorted(f"teacher.{n}" for n in pl_module.teacher.state_dict()),
        }
        if self.out is not None:
            (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.facts))


def distil(path: Path, devices: int, precision: str, batch_size: int, placement: dict | None) -> None:
    """Distil the tiny student for 3 epochs with ``devices`` processes; ranks report to ``path``."""
    L.seed_everything(7)
    callbacks = [Probe(path), ReleaseProcessGroup()]
    callbacks += [TeacherPlacement(**placement)] if placement is not None else []
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        precision=precision,
        max_epochs=3,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=path,
        callbacks=callbacks,
    )
    module = make_module()
    trainer.fit(module, make_dm(batch_size))
    trainer.save_checkpoint(path / "final.ckpt")


# ---------------------------------------------------------------------------------------------
# Teacher placement, one process


def fit(tmp_path, module, callbacks, steps: int = 4, **kwargs) -> L.Trainer:
    trainer = quiet_trainer(
        tmp_path, max_steps=steps, limit_val_batches=1, num_sanity_val_steps=0, callbacks=callbacks, **kwargs
    )
    trainer.fit(module, make_dm())
    return trainer


@pytest.mark.parametrize(
    ("dtype", "precision"),
    [(None, "32-true"), ("bfloat16", "32-true"), ("bfloat16", "bf16-mixed"), ("float16", "bf16-mixed")],
)
def test_placed_teacher_is_frozen_cast_and_left_out(tmp_path, dtype, precision):
    module, probe = make_module(), Probe()
    placement = TeacherPlacement(dtype=dtype)
    captured = {}

    class Capture(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            captured["logits"] = pl_module.teacher_logits(batch)
            captured["ddp_ignore"] = list(pl_module._ddp_params_and_buffers_to_ignore)

    trainer = fit(tmp_path, module, [placement, probe, Capture()], precision=precision)
    facts = probe.facts
    assert facts["teacher_placed"] and not facts["teacher_training"]
    assert facts["teacher_dtype"] == str(getattr(torch, dtype or "float32"))
    assert facts["teacher_device"] == facts["student_device"]
    assert facts["teacher_grads"] == [] and facts["teacher_in_optimizer"] == 0
    assert facts["student_in_optimizer"] == facts["student_params"]
    assert all(math.isfinite(x) for x in facts["train_losses"]) and len(facts["train_losses"]) == 4
    # The teacher's logits reach the loss in fp32 whatever the autocast or teacher dtype.
    assert captured["logits"].dtype == torch.float32
    # Every teacher parameter and buffer is on DDP's ignore list (set before any wrapping).
    assert set(captured["ddp_ignore"]) == set(facts["teacher_keys"]) and len(captured["ddp_ignore"]) > 0
    # Not in the checkpoint; the wrapper is gone after the run and the checkpoint reloads into a fresh module.
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    state = torch.load(tmp_path / "s.ckpt", weights_only=False)["state_dict"]
    assert not [k for k in state if k.startswith("teacher.")]
    assert not isinstance(module.teacher, PlacedTeacher)
    fresh = make_module(seed=1)
    fresh.load_state_dict({**state, **{f"teacher.{k}": v for k, v in fresh.teacher.state_dict().items()}})


def test_half_teacher_logits_match_fp32_within_half_precision(tmp_path):
    module = make_module()
    x = torch.randn(16, *SHAPE)
    with torch.no_grad():
        reference = module.teacher.eval()(x)
    size = float(reference.abs().max())
    for dtype in ("bfloat16", "float16"):
        placed = TeacherPlacement(dtype=dtype)._place(make_module().teacher)
        with torch.no_grad():
            logits = placed(x)
        assert logits.dtype == torch.float32
        # 4 layers (2 convolutions, 2 linear), each rounding its weights and outputs to `dtype`: a few
        # eps each, on (batch-normalised) activations of size <= max(1, |logits|).
        tol = 4 * torch.finfo(getattr(torch, dtype)).eps * max(1.0, size)
        torch.testing.assert_close(logits, reference, atol=tol, rtol=0)
        # The soft-target loss is computed in fp32 from them: equal teacher logits give zero, up to the
        # bf16 rounding d <= eps_bf16 / 2 |z| of one side (KL ~ d**2 / 2; the T**2 cancels) and the
        # fp32 loss's own rounding, (4 + C) eps T**2 (max|z| / T + log C).
        T, C = 4.0, logits.shape[-1]
        d = torch.finfo(torch.bfloat16).eps / 2 * float(logits.abs().max())
        fp32 = (4 + C) * EPS32 * T**2 * (float(logits.abs().max()) / T + math.log(C))
        loss = float(soft_target_loss(logits, logits.to(torch.bfloat16), T))
        assert loss == pytest.approx(0, abs=d**2 / 2 + fp32)


def test_channels_last_teacher(tmp_path):
    module, probe = make_module(), Probe()
    seen = {}

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            conv = next(m for m in pl_module.teacher.modules() if isinstance(m, nn.Conv2d))
            seen["weight"] = conv.weight.is_contiguous(memory_format=torch.channels_last)

            def record(conv, args):
                seen.setdefault("input", args[0].is_contiguous(memory_format=torch.channels_last))

            conv.register_forward_pre_hook(record)

    fit(tmp_path, module, [TeacherPlacement(channels_last=True), probe, Spy()])
    assert seen == {"weight": True, "input": True}
    assert all(math.isfinite(x) for x in probe.train_losses)


def test_compiled_teacher(tmp_path):
    """``torch.compile`` with the eager backend checks the wiring in seconds (names unchanged, frozen,
    fp32 logits); inductor's C++ build on a busy CPU takes minutes and tests nothing of ours."""
    module, probe = make_module(), Probe()
    placement = TeacherPlacement(compile=True, compile_kwargs={"backend": "eager"})
    fit(tmp_path, module, [placement, probe], steps=2)
    assert probe.facts["teacher_grads"] == [] and all(math.isfinite(x) for x in probe.train_losses)
    # Compiled in place: parameter names are those of the teacher as loaded.
    assert not any("_orig_mod" in k for k in probe.facts["teacher_keys"])
    assert module.teacher._compiled_call_impl is not None


def test_teacher_stays_in_eval_through_validation(tmp_path):
    module = make_module()

    class Modes(L.Callback):
        modes: list[bool] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.modes.append(pl_module.teacher.training or pl_module.teacher.module.training)

    modes = Modes()
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        callbacks=[TeacherPlacement(), modes],
    )
    trainer.fit(module, make_dm())
    assert modes.modes == [False] * 4


def test_placement_leaves_cache_served_modules_alone_and_refuses_classifiers(tmp_path):
    student_only = DistillationModule(partial(MLP, hidden=(8,)), 4, SHAPE)
    TeacherPlacement(dtype="bfloat16").setup(quiet_trainer(tmp_path), student_only, "fit")
    assert student_only.teacher is None
    classifier = ClassifierModule(partial(MLP, hidden=(8,)), 4, SHAPE)
    with pytest.raises(
        TypeError, match="needs a LightningModule with a `teacher` attribute.*ClassifierModule"
    ):
        TeacherPlacement().setup(quiet_trainer(tmp_path), classifier, "fit")
    with pytest.raises(
        ValueError, match=r"`dtype` must be one of \['bfloat16', 'float16'\] or None, got 'fp8'"
    ):
        TeacherPlacement(dtype="fp8")


def test_placement_hooks_pass_over_modules_without_a_teacher(tmp_path):
    """Moving, unwrapping: modules that carry no teacher (or carry None) are left as they are."""
    placement, trainer = TeacherPlacement(), quiet_trainer(tmp_path)
    classifier = ClassifierModule(partial(MLP, hidden=(8,)), 4, SHAPE)
    student_only = DistillationModule(partial(MLP, hidden=(8,)), 4, SHAPE)
    for module in (classifier, student_only):
        placement.on_fit_start(trainer, module)
        placement.teardown(trainer, module, "fit")
    assert student_only.teacher is None and not isinstance(classifier, TeacherCarrier)


def test_placement_keeps_earlier_ddp_ignore_entries(tmp_path):
    module = make_module()
    assert not isinstance(module, DDPIgnoring)  # nothing set yet: only the teacher's names go in
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ["net.extra"])
    assert isinstance(module, DDPIgnoring)
    TeacherPlacement().setup(quiet_trainer(tmp_path), module, "fit")
    ignored = set(module._ddp_params_and_buffers_to_ignore)
    assert "net.extra" in ignored and {n for n in ignored if n.startswith("teacher.")}


def test_distillation_module_declares_its_teacher():
    """A teacher held as a submodule is invisible to `inspect.getattr_static`, which Python 3.12+'s
    protocol `isinstance` uses: the module is a TeacherCarrier by subclassing, on every version."""
    module = make_module()
    with pytest.raises(AttributeError):
        inspect.getattr_static(module, "teacher")
    assert TeacherCarrier in DistillationModule.__mro__
    assert isinstance(module, TeacherCarrier)


# ---------------------------------------------------------------------------------------------
# Two processes (ddp_spawn, gloo) against one


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same distillation (bf16-mixed, bf16 teacher) with 1 process at batch 64 and 2 at batch 32 each."""
    placement = {"dtype": "bfloat16"}
    one = tmp_path_factory.mktemp("one")
    two = tmp_path_factory.mktemp("two")
    distil(one, 1, "bf16-mixed", 64, placement)
    distil(two, 2, "bf16-mixed", 32, placement)
    return (
        [json.loads((one / "rank0.json").read_text())],
        [json.loads((two / f"rank{r}.json").read_text()) for r in range(2)],
        two,
    )


@pytest.mark.slow  # two spawned processes import torch and Lightning: about 20 s on 2 busy cores
def test_two_process_bf16_distillation_agrees_across_ranks(runs):
    _, two, path = runs
    assert [r["world_size"] for r in two] == [2, 2] and sorted(r["rank"] for r in two) == [0, 1]
    for r in two:
        assert r["train_losses"] and all(math.isfinite(x) for x in r["train_losses"])
        # the teacher: one replica per rank, bf16, frozen, never optimised, never synced by DDP
        assert r["teacher_dtype"] == "torch.bfloat16" and not r["teacher_training"]
        assert r["teacher_grads"] == [] and r["teacher_in_optimizer"] == 0
        assert set(r["teacher_keys"]) <= set(r["ddp_ignored"])
        assert r["ddp_synced"] and not [n for n in r["ddp_synced"] if n.startswith("teacher.")]
    # Validation metrics are synced: every rank logs the same accuracy and loss.
    # Both ranks hold the same all-reduced sum (a + b == b + a exactly), so the values are equal.
    assert two[0]["val_acc"] == two[1]["val_acc"]
    assert two[0]["val_loss"] == two[1]["val_loss"]
    state = torch.load(path / "final.ckpt", weights_only=False)["state_dict"]
    assert state and not [k for k in state if k.startswith("teacher.")]


@pytest.mark.slow
def test_two_processes_reach_the_one_process_metrics(runs):
    """Same data, seed and global batch (64): the sample order differs (DistributedSampler), so the
    runs agree within a tolerance, not bit for bit: accuracy within 4 of the 64 validation images,
    loss within 25%. Both must have learned the planted rule (chance is 0.25)."""
    (one,), two, _ = runs
    assert one["val_acc"] > 0.6 and two[0]["val_acc"] > 0.6
    assert abs(one["val_acc"] - two[0]["val_acc"]) <= 4 / 64
    assert two[0]["val_loss"] == pytest.approx(one["val_loss"], rel=0.25)
    assert len(one["train_losses"]) == len(two[0]["train_losses"])  # the same number of optimizer steps


# ---------------------------------------------------------------------------------------------
# `kd fit` under strategy="ddp" (a subprocess: Lightning relaunches the command for rank 1)


def write_tiny_configs(path: Path) -> tuple[Path, Path]:
    """A Synthetic-data teacher checkpoint and a distillation config that reads it, both tiny."""
    data = {
        "class_path": "kd_lightning.datamodules.IndexedDataModule",
        "init_args": {
            "source": {
                "class_path": "kd_lightning.datamodules.Synthetic",
                "init_args": {
                    "num_superclasses": 2,
                    "classes_per_superclass": 2,
                    "dim": 8,
                    "train_per_class": 64,
                    "test_per_class": 8,
                },
            },
            "batch_size": 32,
            "eval_batch_size": 64,
            "val_size": 64,
        },
    }
    torch.manual_seed(0)
    teacher = ClassifierModule(partial(MLP, hidden=(16,)), 4, (8,))
    trainer = quiet_trainer(path, max_epochs=2, limit_val_batches=0)
    dm = IndexedDataModule(
        Synthetic(**data["init_args"]["source"]["init_args"]), batch_size=32, eval_batch_size=64, val_size=64
    )
    trainer.fit(teacher, dm)
    ckpt = path / "teacher.ckpt"
    trainer.save_checkpoint(ckpt)
    config = {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 2,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(path / "run"),
            "callbacks": [
                {"class_path": "kd_lightning.callbacks.TeacherPlacement", "init_args": {"dtype": "bfloat16"}},
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(path / "run"), "filename": "final"},
                },
            ],
        },
        "model": {
            "class_path": "kd_lightning.modules.DistillationModule",
            "init_args": {
                "student": {"class_path": "kd_lightning.models.MLP", "init_args": {"hidden": [8]}},
                "teacher_ckpt": str(ckpt),
            },
        },
        "data": data,
    }
    return _write(path / "distill.yaml", config), ckpt


def _write(path: Path, obj: dict) -> Path:
    path.write_text(yaml.safe_dump(obj))
    return path


def kd_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow  # two `kd` processes: about 25 s on 2 busy cores
def test_kd_fit_under_ddp_with_bf16(tmp_path):
    config, _ = write_tiny_configs(tmp_path)
    kd = str(Path(sys.executable).with_name("kd"))
    args = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.precision=bf16-mixed"]
    proc = subprocess.run(
        [kd, "fit", "--config", str(config), *args],
        cwd=tmp_path,
        env=kd_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed_backend=gloo" in proc.stderr + proc.stdout
    assert "All distributed processes registered. Starting with 2 processes" in proc.stderr + proc.stdout
    ckpt = torch.load(tmp_path / "run" / "final.ckpt", weights_only=False)
    assert ckpt["epoch"] == 1 and not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]
    # 256 samples less 64 for validation, 2 processes of 32: 3 steps per epoch, 2 epochs.
    assert ckpt["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
