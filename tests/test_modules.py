"""Classifier and distillation modules with real Trainers on tiny data."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch

from kd_lightning.models import MLP, SmallCNN
from kd_lightning.modules import ClassifierModule, DistillationModule, load_teacher, teacher_num_classes
from kd_lightning.objectives import HintonKD

SHAPE = (1, 8, 8)
# BatchNorm and dropout make train/eval mode observable in the teacher's outputs and buffers.
TEACHER_NET = partial(SmallCNN, channels=(4,), head=16, dropout=0.5)
STUDENT_NET = partial(MLP, hidden=(16,))


@pytest.fixture
def teacher_ckpt(tmp_path, tiny_dm, trainer_factory):
    L.seed_everything(0)
    dm = tiny_dm()
    teacher = ClassifierModule(TEACHER_NET, num_classes=4, input_shape=SHAPE)
    trainer = trainer_factory(max_steps=8, limit_val_batches=1)
    trainer.fit(teacher, dm)
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


class FrozenTeacherCheck(L.Callback):
    """Asserts at every hook that matters that the teacher is in eval mode with no gradients."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def _check(self, module: DistillationModule, where: str) -> None:
        assert all(not m.training for m in module.teacher.modules()), f"teacher in train mode at {where}"
        for p in module.teacher.parameters():
            assert not p.requires_grad and p.grad is None, f"teacher parameter trainable at {where}"
        self.events.append(where)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._check(module, f"train_start:{trainer.current_epoch}")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._check(module, "train_end")

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self._check(module, "val")

    def on_validation_end(self, trainer, module):
        self._check(module, "val_end")


def test_distil_from_checkpoint_keeps_teacher_frozen(tmp_path, teacher_ckpt, tiny_dm, trainer_factory):
    reference = load_teacher(teacher_ckpt)
    before = {k: v.clone() for k, v in reference.state_dict().items()}

    student = DistillationModule(
        STUDENT_NET, num_classes=4, input_shape=SHAPE, teacher_ckpt=str(teacher_ckpt)
    )
    check = FrozenTeacherCheck()
    trainer = trainer_factory(max_epochs=2, limit_train_batches=3, limit_val_batches=1, callbacks=[check])
    trainer.fit(student, tiny_dm())
    # Everything the issue asks to be logged is there.
    for key in (
        "train/loss",
        "train/hard",
        "train/soft",
        "train/agreement",
        "val/acc",
        "val/teacher_acc",
        "val/agreement",
    ):
        assert key in trainer.callback_metrics, key
        assert torch.isfinite(trainer.callback_metrics[key])
    trainer.validate(student, tiny_dm(), verbose=False)

    # Training resumed after a validation loop and the teacher was still in eval mode then.
    assert "train_start:1" in check.events and "val_end" in check.events
    # Never in the optimizer; every student parameter is.
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in student.teacher.parameters()}
    assert {id(p) for p in student.student.parameters()} <= in_optimizer
    # Weights and BatchNorm statistics untouched.
    for key, value in student.teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"teacher tensor {key} changed"  # bit for bit

    # The student's checkpoint holds no teacher weight and reloads strictly.
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert saved and not [k for k in saved if k.startswith("teacher.")]
    x = torch.randn(5, *SHAPE)
    student.eval()
    for reloaded in (
        DistillationModule.load_from_checkpoint(
            path, weights_only=False
        ),  # teacher reloaded from teacher_ckpt
        DistillationModule.load_from_checkpoint(path, weights_only=False, teacher_ckpt=None),  # student only
    ):
        torch.testing.assert_close(reloaded.eval()(x), student(x))
    assert (
        DistillationModule.load_from_checkpoint(path, weights_only=False, teacher_ckpt=None).teacher is None
    )


def test_teacher_loaded_from_checkpoint_predicts_like_the_original(teacher_ckpt):
    original = ClassifierModule.load_from_checkpoint(teacher_ckpt, weights_only=False).eval()
    teacher = load_teacher(teacher_ckpt)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(3, *SHAPE)
    torch.testing.assert_close(teacher(x), original(x))


def test_teacher_given_as_module_and_first_step_loss(tiny_dm):
    torch.manual_seed(0)
    teacher = TEACHER_NET(SHAPE, 4)
    module = DistillationModule(
        STUDENT_NET, 4, SHAPE, teacher=teacher, objective=HintonKD(temperature=2.0, hard_weight=0.3)
    )
    dm = tiny_dm()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module.train()
    assert not teacher.training  # eval even right after module.train()
    with torch.no_grad():
        s, t = module(batch["input"]), teacher(batch["input"])
    from kd_lightning.losses import distillation_loss

    expected = distillation_loss(s, t, batch["target"], 2.0, 0.3)["loss"]
    module.log = lambda *a, **k: None  # no Trainer attached
    torch.testing.assert_close(module.training_step(batch, 0).detach(), expected)


def test_class_count_mismatch_is_named(teacher_ckpt):
    with pytest.raises(ValueError, match=r"num_classes.*3|3.*num_classes"):
        DistillationModule(STUDENT_NET, num_classes=3, input_shape=SHAPE, teacher_ckpt=str(teacher_ckpt))


def test_missing_or_foreign_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher_ckpt"):
        DistillationModule(STUDENT_NET, 4, SHAPE, teacher_ckpt=str(tmp_path / "nope.ckpt"))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not a kd-lightning checkpoint"):
        DistillationModule(STUDENT_NET, 4, SHAPE, teacher_ckpt=str(foreign))


def test_both_teachers_or_none(teacher_ckpt, tiny_dm, trainer_factory):
    with pytest.raises(ValueError, match="either `teacher` or `teacher_ckpt`"):
        DistillationModule(
            STUDENT_NET, 4, SHAPE, teacher=TEACHER_NET(SHAPE, 4), teacher_ckpt=str(teacher_ckpt)
        )
    lonely = DistillationModule(STUDENT_NET, 4, SHAPE)
    with pytest.raises(RuntimeError, match="no teacher"):
        trainer_factory(max_steps=1, limit_val_batches=0).fit(lonely, tiny_dm())


def test_num_classes_checked():
    with pytest.raises(ValueError, match="num_classes"):
        ClassifierModule(STUDENT_NET, num_classes=1, input_shape=SHAPE)


def test_classifier_learns(tiny_dm, trainer_factory):
    L.seed_everything(0)
    module = ClassifierModule(STUDENT_NET, 4, SHAPE)
    trainer = trainer_factory(max_epochs=3, limit_val_batches=1)
    trainer.fit(module, tiny_dm())
    assert trainer.callback_metrics["val/acc"] > 0.6  # chance is 0.25
    out = trainer.predict(module, tiny_dm())
    assert set(out[0]) == {"index", "logits"} and out[0]["logits"].shape[1] == 4


def test_evaluation_steps_return_the_eval_output(tiny_dm):
    """Every step returns what the callbacks read (kd_lightning.contracts.EvalOutput), detached."""
    torch.manual_seed(0)
    dm = tiny_dm()
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    classifier = ClassifierModule(STUDENT_NET, 4, SHAPE).eval()
    teacher = TEACHER_NET(SHAPE, 4)
    student = DistillationModule(STUDENT_NET, 4, SHAPE, teacher=teacher).eval()
    with torch.no_grad():
        expected = {"logits": student(batch["input"]), "teacher_logits": teacher.eval()(batch["input"])}
    for module in (classifier, student):
        for step in (module.validation_step, module.test_step):
            out = step(batch, 0)
            assert set(out) == (
                {"logits", "target"} if module is classifier else {"logits", "target", "teacher_logits"}
            )
            assert out["logits"].shape == (batch["target"].shape[0], 4) and not out["logits"].requires_grad
            assert torch.equal(out["target"], batch["target"])
    out = student.validation_step(batch, 0)
    for key, value in expected.items():
        torch.testing.assert_close(out[key], value, rtol=0, atol=0)
    # A teacher's outputs served with the batch are returned as given.
    served = student.validation_step({**batch, "teacher_logits": torch.ones(batch["target"].shape[0], 4)}, 0)
    assert torch.equal(served["teacher_logits"], torch.ones(batch["target"].shape[0], 4))


def test_teacher_num_classes_reads_a_class_count_or_runs_the_teacher():
    calls = []

    class Counted(torch.nn.Linear):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    recorded = Counted(5, 3)
    recorded.num_classes = 3
    assert teacher_num_classes(recorded, (5,)) == 3 and calls == []  # a ClassCount: no forward pass
    unknown = Counted(5, 7)
    unknown.num_classes = None  # not an integer: the forward pass decides
    assert teacher_num_classes(unknown, (5,)) == 7 and calls == [1]
    assert teacher_num_classes(Counted(5, 2), (5,)) == 2 and calls == [1, 1]  # no `num_classes` at all
