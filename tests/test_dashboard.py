"""DistillationDashboard: stable keys with sane values, its pictures, classifiers, DDP; the plot helpers."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import TinySource
from torchmetrics.classification import MulticlassCalibrationError
from trainers import ReleaseProcessGroup

from kd_lightning.calibration import ReliabilityBins
from kd_lightning.callbacks import DistillationDashboard
from kd_lightning.datamodules.base import IndexedDataModule
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.modules import ClassifierModule, DistillationModule
from kd_lightning.objectives import HintonKD
from kd_lightning.plots import (
    plot_confusion_matrix,
    plot_per_class_accuracy,
    plot_reliability,
    plot_specialist_breakdown,
)

SHAPE = (1, 8, 8)
TEACHER_NET = partial(SmallCNN, channels=(4,), head=16)
STUDENT_NET = partial(MLP, hidden=(16,))
PNG = b"\x89PNG\r\n\x1a\n"
STUDENT_KEYS = {"student_ece"}
TEACHER_KEYS = {"teacher_ece", "kl_teacher_student"}
# What the module logs itself: the dashboard must not log a second copy of it.
MODULE_OWNED = {
    "loss_hard",
    "loss_soft",
    "loss_total",
    "temperature",
    "student_acc",
    "teacher_acc",
    "agreement",
}
EPS32 = torch.finfo(torch.float32).eps


def student(teacher_seed: int = 0) -> DistillationModule:
    torch.manual_seed(teacher_seed)
    teacher = TEACHER_NET(SHAPE, 4)
    return DistillationModule(STUDENT_NET, 4, SHAPE, teacher=teacher, objective=HintonKD(2.0, 0.5))


def dashboard_values(metrics: dict[str, torch.Tensor], prefix: str = "dashboard") -> dict[str, float]:
    return {k[len(prefix) + 1 :]: float(v) for k, v in metrics.items() if k.startswith(prefix + "/")}


def assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG, path
    assert path.stat().st_size > 5_000, f"{path} is suspiciously small"


def test_student_dashboard_logs_every_key_and_draws_its_pictures(tmp_path, tiny_dm, trainer_factory):
    dash = DistillationDashboard(n_bins=10, dirpath=str(tmp_path / "run"))
    trainer = trainer_factory(max_epochs=2, limit_train_batches=3, callbacks=[dash])
    module = student()
    trainer.fit(module, tiny_dm())

    values = dashboard_values(trainer.callback_metrics)
    class_keys = {f"{side}_class_acc/{c}_c{c}" for side in ("student", "teacher") for c in range(4)}
    assert set(values) == STUDENT_KEYS | TEACHER_KEYS | class_keys, sorted(values)
    assert all(math.isfinite(v) for v in values.values()), values
    # Accuracies, agreement, the objective and its temperature are the module's own metrics only.
    assert not MODULE_OWNED & set(values)
    metrics = trainer.callback_metrics
    for key in ("val/loss", "val/acc", "val/teacher_acc", "val/agreement", "val/kd_loss", "val/kd_hard"):
        assert math.isfinite(float(metrics[key])), key
    assert float(metrics["val/kd_soft"]) > 0 and float(metrics["train/temperature"]) == 2.0
    # The objective's hard term is the cross-entropy the module logs as its loss: the same fp32 sums.
    assert float(metrics["val/kd_hard"]) == pytest.approx(float(metrics["val/loss"]), rel=4 * EPS32)
    # The dashboard's own values are those of the final student and the teacher on the validation
    # split, recomputed here.
    val = next(iter(trainer.datamodule.val_dataloader()))  # all 64 validation samples
    with torch.no_grad():
        outputs = {"student": module.eval()(val["input"]), "teacher": module.teacher(val["input"])}
    # KL(teacher || student) at T = 1, by hand in float64: the dashboard's fp32 KL of 4 classes per
    # sample, averaged over 64 samples, is some 64 roundings of terms of its size off.
    p = outputs["teacher"].double().softmax(-1)
    kl = (p * (p.log() - outputs["student"].double().log_softmax(-1))).sum(-1).mean()
    assert values["kl_teacher_student"] == pytest.approx(float(kl), rel=64 * EPS32)
    # Each ECE sums up to 64 fp32 confidences <= 1 per bin, so agrees to 64 eps.
    for side, logits in outputs.items():
        ece = MulticlassCalibrationError(4, n_bins=10, norm="l1")(logits.softmax(-1), val["target"])
        assert values[f"{side}_ece"] == pytest.approx(float(ece), rel=0, abs=64 * EPS32), side
    for name in ("reliability", "per_class_accuracy", "confusion_matrix"):
        assert dash.pictures[name] == tmp_path / "run" / "dashboard" / f"{name}.png"
        assert_png(dash.pictures[name])


def test_classifier_dashboard_has_no_teacher_keys(tmp_path, tiny_dm, trainer_factory):
    dash = DistillationDashboard(dirpath=str(tmp_path))
    trainer = trainer_factory(max_epochs=1, limit_train_batches=2, callbacks=[dash])
    trainer.fit(ClassifierModule(STUDENT_NET, 4, SHAPE), tiny_dm())
    values = dashboard_values(trainer.callback_metrics)
    assert set(values) >= STUDENT_KEYS and not (TEACHER_KEYS & set(values)), sorted(values)
    assert not MODULE_OWNED & set(values)
    assert "val/loss" in trainer.callback_metrics and "val/kd_loss" not in trainer.callback_metrics
    assert sorted(p.name for p in (tmp_path / "dashboard").iterdir()) == [
        "confusion_matrix.png",
        "per_class_accuracy.png",
        "reliability.png",
    ]


def test_classes_are_numbered_when_the_datamodule_names_none(tmp_path, tiny_dm, trainer_factory):
    class Unnamed(L.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_dm()

        def setup(self, stage: str) -> None:
            self.inner.setup(stage)

        def val_dataloader(self):
            return self.inner.val_dataloader()

    dash = DistillationDashboard(dirpath=str(tmp_path))
    trainer = trainer_factory(callbacks=[dash])
    trainer.validate(ClassifierModule(STUDENT_NET, 4, SHAPE), Unnamed(), verbose=False)
    keys = {k for k in dashboard_values(trainer.callback_metrics) if "class_acc/" in k}
    assert keys == {f"student_class_acc/{c}_{c}" for c in range(4)}, sorted(keys)


def test_sanity_check_is_not_logged_and_history_keeps_each_epoch(tmp_path, tiny_dm, trainer_factory):
    dash = DistillationDashboard(dirpath=str(tmp_path), keep_history=True, every_n_epochs=2)
    trainer = trainer_factory(max_epochs=3, limit_train_batches=1, num_sanity_val_steps=1, callbacks=[dash])
    trainer.fit(ClassifierModule(STUDENT_NET, 4, SHAPE), tiny_dm())
    names = sorted(p.name for p in (tmp_path / "dashboard").glob("reliability*.png"))
    # Epoch 1 (every 2nd) and epoch 2 (the last); not epoch 0, not the sanity check.
    assert names == ["reliability_epoch001.png", "reliability_epoch002.png"]


def test_a_step_without_eval_output_is_a_clear_error(tiny_dm, trainer_factory):
    class Silent(ClassifierModule):
        def validation_step(self, batch, batch_idx):
            super().validation_step(batch, batch_idx)

    trainer = trainer_factory(max_epochs=1, limit_train_batches=1, callbacks=[DistillationDashboard()])
    with pytest.raises(
        TypeError, match="DistillationDashboard reads the EvalOutput that `Silent.validation_step`"
    ):
        trainer.fit(Silent(STUDENT_NET, 4, SHAPE), tiny_dm())


@pytest.mark.parametrize(
    "kwargs, match",
    [({"n_bins": 0}, "n_bins"), ({"every_n_epochs": 1.5}, "every_n_epochs"), ({"prefix": ""}, "prefix")],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillationDashboard(**kwargs)


# ---------------------------------------------------------------------------------------------
# DDP: every rank computes the same (synced) values; only rank 0 draws


class DumpValues(L.Callback):
    """Writes each rank's dashboard values to ``<dir>/rank<R>.json`` (module level: picklable for spawn)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_validation_end(self, trainer, pl_module) -> None:
        values = dashboard_values(trainer.callback_metrics)
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(values))


def ddp_validate(out: Path, devices: int, strategy: str) -> None:
    """Validate one fixed student with the dashboard on ``devices`` processes."""
    module = student()
    data = IndexedDataModule(TinySource(4), batch_size=32, eval_batch_size=16, val_size=64)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=[DistillationDashboard(dirpath=str(out)), DumpValues(str(out)), ReleaseProcessGroup()],
    )
    trainer.validate(module, data, verbose=False)


@pytest.mark.slow  # two spawned processes import torch and Lightning: ~15 s on 2 busy cores
def test_ddp_values_match_one_process_and_only_rank_zero_draws(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    ddp_validate(tmp_path / "one", 1, "auto")
    ddp_validate(tmp_path / "two", 2, "ddp_spawn")
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1], "ranks logged different dashboard values"
    assert set(one) == set(ranks[0]) and len(one) > 10
    for key, value in one.items():
        # 64 validation samples split 32/32: no padding, so the synced values equal one process's, up to
        # fp32 sums of the 64 samples' terms in another order: 64 eps, relative (absolute for the ECE).
        assert ranks[0][key] == pytest.approx(value, rel=64 * EPS32, abs=64 * EPS32), key
    assert sorted(p.name for p in (tmp_path / "two" / "dashboard").iterdir()) == [
        "confusion_matrix.png",
        "per_class_accuracy.png",
        "reliability.png",
    ]


# ---------------------------------------------------------------------------------------------
# Plot helpers


def test_plot_helpers_write_pngs_and_check_shapes(tmp_path):
    names = ["a", "b", "c"]
    bins = ReliabilityBins.from_sums(np.array([0, 2, 8]), np.array([0, 1.0, 7.2]), np.array([0, 1, 6]))
    assert_png(plot_reliability({"student": bins}, tmp_path / "r.png", ece={"student": 0.12}))
    assert_png(plot_per_class_accuracy({"s": [0.5, 1.0, 0.2]}, names, tmp_path / "a.png"))
    assert_png(plot_confusion_matrix(torch.eye(3) * 5 + 1, names, tmp_path / "sub" / "cm.png"))
    with pytest.raises(ValueError, match="accuracy"):
        plot_per_class_accuracy({"s": [0.5]}, names, tmp_path / "x.png")
    with pytest.raises(ValueError, match="matrix"):
        plot_confusion_matrix(torch.eye(2), names, tmp_path / "x.png")
    with pytest.raises(ValueError, match="bins"):
        plot_reliability({}, tmp_path / "x.png", ece={})
    with pytest.raises(ValueError, match="ece"):  # the diagram draws the ECE it is given, never its own
        plot_reliability({"student": bins}, tmp_path / "x.png", ece={})
    assert not (tmp_path / "x.png").exists() and not list(tmp_path.glob(".*partial*"))


def test_specialist_breakdown_picture(tmp_path):
    from kd_lightning.specialists import specialist_report

    y = torch.tensor([0, 1, 2, 2, 3, 3])
    cover = torch.tensor([0, 1, 1, 2, 2, 2])
    report = specialist_report(
        y, {"generalist": torch.tensor([0, 0, 2, 1, 3, 0]), "kl": torch.tensor([0, 1, 2, 1, 3, 3])}, cover
    )
    assert_png(plot_specialist_breakdown(report, tmp_path / "table4.png"))
    with pytest.raises(ValueError, match="by_cover"):
        plot_specialist_breakdown({"acc": {}}, tmp_path / "x.png")
