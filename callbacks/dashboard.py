"""DistillationDashboard: what a person looks at to judge a teacher, a student and how they relate.

The module's own metrics (``val/loss``, ``val/acc``, and for a student ``val/kd_loss``,
``val/teacher_acc``, ``val/agreement``; ``train/temperature``) are the single source of those numbers.
The dashboard adds, per validation epoch (sanity checks excluded), what only it computes, under stable
keys (``<prefix>`` is ``dashboard`` by default):

=========================================  ==========================================================
``<prefix>/kl_teacher_student``            mean KL(teacher || student) at T = 1, nats (students), by
                                           :func:`kd_lightning.losses.soft_target_loss`
``<prefix>/student_ece``, ``teacher_ece``  expected calibration error (top-label, L1, ``n_bins`` bins;
                                           :mod:`kd_lightning.calibration`)
``<prefix>/student_class_acc/<c>_<name>``  accuracy per class (and ``teacher_class_acc/...``)
=========================================  ==========================================================

and draws, on global rank 0, three pictures into ``<run dir>/dashboard/`` that also go to W&B under
the same names (``<prefix>/reliability``, ``<prefix>/per_class_accuracy``, ``<prefix>/confusion_matrix``):
reliability diagrams of both models, per-class accuracy of both, and the student's confusion matrix.
The run directory is ``dirpath`` or else the Trainer's ``log_dir`` (a WandbLogger's ``save_dir``).

Under DDP every statistic is a torchmetrics state summed or gathered over the processes and computed
on every rank (``compute()`` is collective), so all ranks log the same numbers; only rank 0 draws.
A DistributedSampler pads the validation split with a few repeated samples, as for the module's own
metrics.

Logits come from the module's ``validation_step`` output, the
:class:`~kd_lightning.contracts.EvalOutput` every module of the package returns (``logits``,
``target`` and, for a student, ``teacher_logits``); the model is never run a second time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix
from typing_extensions import override

from kd_lightning.calibration import ConfidenceBins, calibration_error
from kd_lightning.contracts import Batch, EvalOutput, NamedClasses, check_eval_output
from kd_lightning.losses import soft_target_loss
from kd_lightning.plots import plot_confusion_matrix, plot_per_class_accuracy, plot_reliability

PICTURES = ("reliability", "per_class_accuracy", "confusion_matrix")


def _model_metrics(num_classes: int, n_bins: int, confusion: bool) -> nn.ModuleDict:
    metrics: dict[str, nn.Module] = {
        "class_acc": MulticlassAccuracy(num_classes, average=None),
        "ece": calibration_error(num_classes, n_bins),
        "bins": ConfidenceBins(n_bins),
    }
    if confusion:
        metrics["confusion"] = MulticlassConfusionMatrix(num_classes)
    return nn.ModuleDict(metrics)


class DistillationDashboard(Callback):
    """Log the distillation dashboard (KL, calibration, per-class accuracy, confusion) once per
    validation epoch, and draw its pictures as PNGs (and W&B images).

    Works for every module of the package, from the :class:`~kd_lightning.contracts.EvalOutput` its
    ``validation_step`` returns: a :class:`~kd_lightning.modules.DistillationModule` (student and
    teacher) or any classifier (student-only keys).

    Args:
        n_bins: confidence bins of the ECE and the reliability diagram.
        every_n_epochs: draw the pictures every this many validation epochs (and always at the last
            epoch of ``fit`` and in ``validate``); the scalars are logged every epoch.
        dirpath: run directory the pictures go under (``<dirpath>/dashboard/``); default: the Trainer's
            ``log_dir``.
        prefix: first part of every key.
        keep_history: also keep each epoch's pictures (``<name>_epoch<E>.png``); by default the
            latest replaces the previous one.

    Raises:
        ValueError: ``n_bins`` or ``every_n_epochs`` is not a positive integer, or ``prefix`` is empty.
    """

    def __init__(
        self,
        n_bins: int = 15,
        every_n_epochs: int = 1,
        dirpath: str | None = None,
        prefix: str = "dashboard",
        keep_history: bool = False,
    ) -> None:
        for name, value in (("n_bins", n_bins), ("every_n_epochs", every_n_epochs)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not prefix:
            raise ValueError(f"`prefix` must be a non-empty string, got {prefix!r}.")
        self.n_bins = n_bins
        self.every_n_epochs = every_n_epochs
        self.dirpath = dirpath
        self.prefix = prefix.rstrip("/")
        self.keep_history = keep_history
        #: Paths of the pictures drawn last (rank 0), by name.
        self.pictures: dict[str, Path] = {}
        self._metrics: nn.ModuleDict | None = None
        self._num_classes = 0
        self._active = False
        self._names: list[str] = []

    # -----------------------------------------------------------------------------------------
    # Hooks

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = not trainer.sanity_checking
        if self._active:
            self._reset(pl_module.device)

    @override
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: EvalOutput,
        batch: Batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._active:
            check_eval_output(outputs, pl_module, "DistillationDashboard")
            self._update(outputs["logits"], outputs.get("teacher_logits"), outputs["target"])

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        self._active = False
        values, drawings = self._compute()
        for key, value in values.items():
            # Already reduced over processes by torchmetrics: no second sync.
            pl_module.log(f"{self.prefix}/{key}", value, sync_dist=False)
        if self._draw_due(trainer):
            run_dir = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)  # collective
            if trainer.is_global_zero:
                self._draw(trainer, drawings, run_dir / "dashboard")

    # -----------------------------------------------------------------------------------------
    # Helpers

    def _metrics_for(self, num_classes: int, device: torch.device) -> nn.ModuleDict:
        """The metric states, made at the first batch of the run (the width of its logits: a
        specialist has one output more than the data has classes) and reset every epoch."""
        if self._metrics is None or num_classes != self._num_classes:
            self._num_classes = num_classes
            self._metrics = nn.ModuleDict(
                {
                    "student": _model_metrics(num_classes, self.n_bins, confusion=True),
                    "teacher": _model_metrics(num_classes, self.n_bins, confusion=False),
                    "kl_teacher_student": MeanMetric(),
                }
            ).to(device)
        return self._metrics

    def _reset(self, device: torch.device | None = None) -> None:
        if self._metrics is None:
            return
        if device is not None:
            self._metrics.to(device)
        for metric in self._metrics.modules():
            if isinstance(metric, Metric):
                metric.reset()

    def _update(self, student: Tensor, teacher: Tensor | None, target: Tensor) -> None:
        m = self._metrics_for(student.shape[-1], student.device)
        # fp32 whatever the Trainer's precision: softmax and KL in bf16 lose the small probabilities.
        student = student.float()
        self._update_model(m["student"], student.softmax(-1), target)
        if teacher is not None:
            teacher = teacher.float()
            self._update_model(m["teacher"], teacher.softmax(-1), target)
            kl = soft_target_loss(student, teacher, temperature=1.0, kind="kl")  # the batch's mean
            m["kl_teacher_student"].update(kl, weight=target.shape[0])

    @staticmethod
    def _update_model(metrics: nn.ModuleDict, probs: Tensor, target: Tensor) -> None:
        for metric in metrics.values():
            metric.update(probs, target)

    def _compute(self) -> tuple[dict[str, float], dict[str, Any]]:
        """Every metric's value (collective: every rank calls it), the scalars and what the pictures need."""
        values: dict[str, float] = {}
        drawings: dict[str, Any] = {"bins": {}, "ece": {}, "class_acc": {}}
        m = self._metrics
        if m is None:  # no validation batch
            return values, drawings
        for side in ("student", "teacher"):
            metrics = m[side]
            if not metrics["class_acc"].update_called:
                continue
            values[f"{side}_ece"] = float(metrics["ece"].compute())
            class_acc = metrics["class_acc"].compute().cpu()
            drawings["class_acc"][side] = class_acc
            drawings["bins"][side] = metrics["bins"].compute()
            drawings["ece"][side] = values[f"{side}_ece"]
            if side == "student":
                drawings["confusion"] = metrics["confusion"].compute().cpu()
            for c, acc in enumerate(class_acc.tolist()):
                values[f"{side}_class_acc/{self._class_key(c)}"] = acc
        if m["kl_teacher_student"].update_called:
            values["kl_teacher_student"] = float(m["kl_teacher_student"].compute())
        self._reset()
        return values, drawings

    def _class_key(self, c: int) -> str:
        width = len(str(self._num_classes - 1))
        name = self._names[c] if len(self._names) == self._num_classes else str(c)
        return f"{c:0{width}d}_{re.sub(r'[^0-9A-Za-z]+', '_', name).strip('_')}"

    def _draw_due(self, trainer: L.Trainer) -> bool:
        if trainer.state.fn != "fit":
            return True
        last = trainer.max_epochs is not None and trainer.current_epoch == trainer.max_epochs - 1
        return last or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        names = datamodule.class_names if isinstance(datamodule, NamedClasses) else []
        self._names = [str(n) for n in names]

    def _draw(self, trainer: L.Trainer, drawings: dict[str, Any], out: Path) -> None:
        c = self._num_classes
        # A specialist has one output (the dustbin) more than the data has class names.
        names = self._names if len(self._names) == c else [str(i) for i in range(c)]
        epoch = f"epoch {trainer.current_epoch}"
        step = trainer.global_step
        suffix = f"_epoch{trainer.current_epoch:03d}" if self.keep_history else ""
        loggers = trainer.loggers
        if drawings["bins"]:
            self.pictures["reliability"] = plot_reliability(
                drawings["bins"],
                out / f"reliability{suffix}.png",
                ece=drawings["ece"],
                title=f"reliability, validation, {epoch}",
                loggers=loggers,
                key=f"{self.prefix}/reliability",
                step=step,
            )
            self.pictures["per_class_accuracy"] = plot_per_class_accuracy(
                drawings["class_acc"],
                names,
                out / f"per_class_accuracy{suffix}.png",
                title=f"accuracy per class, validation, {epoch}",
                loggers=loggers,
                key=f"{self.prefix}/per_class_accuracy",
                step=step,
            )
        if "confusion" in drawings:
            self.pictures["confusion_matrix"] = plot_confusion_matrix(
                drawings["confusion"],
                names,
                out / f"confusion_matrix{suffix}.png",
                title=f"student confusion matrix, validation, {epoch}",
                loggers=loggers,
                key=f"{self.prefix}/confusion_matrix",
                step=step,
            )
