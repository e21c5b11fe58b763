"""DistillationDashboard: what a person looks at to judge a teacher, a student and how they relate.

Per validation epoch (sanity checks excluded) the callback logs, under stable keys (``<prefix>`` is
``dashboard`` by default):

=========================================  ==========================================================
``<prefix>/loss_hard``                     cross-entropy with the labels (the objective's hard term)
``<prefix>/loss_soft``                     the objective's soft term (students only; each component the
                                           objective returns is logged as ``loss_<name>``)
``<prefix>/loss_total``                    the objective's total (a classifier: its cross-entropy)
``<prefix>/temperature``                   the objective's temperature (students)
``<prefix>/student_acc``                   top-1 accuracy of the module
``<prefix>/teacher_acc``                   top-1 accuracy of the teacher (students)
``<prefix>/agreement``                     share of samples where their top-1 classes agree (students)
``<prefix>/kl_teacher_student``            mean KL(teacher || student) at T = 1, nats (students)
``<prefix>/student_ece``, ``teacher_ece``  expected calibration error (L1, ``n_bins`` bins)
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

Logits come from the module's ``validation_step`` output (``{"logits", "teacher_logits"}``, as the
modules of :mod:`kd_lightning.modules` return); a module whose step returns nothing is run once more
on the batch, and the teacher's logits are then taken from ``batch["teacher_logits"]`` or its
``teacher`` attribute.
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
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
)
from typing_extensions import override

from kd_lightning.plots import (
    ReliabilityBins,
    plot_confusion_matrix,
    plot_per_class_accuracy,
    plot_reliability,
)

PICTURES = ("reliability", "per_class_accuracy", "confusion_matrix")


class ConfidenceBins(Metric):
    """Per confidence bin: samples, sum of top-1 confidences and of correct predictions (summed over ranks)."""

    full_state_update = False

    def __init__(self, n_bins: int) -> None:
        super().__init__()
        self.n_bins = n_bins
        for name in ("counts", "confidence_sums", "correct_sums"):
            self.add_state(name, torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        confidence, predicted = probs.max(-1)
        bins = (confidence * self.n_bins).long().clamp_(0, self.n_bins - 1)
        self.counts += torch.bincount(bins, minlength=self.n_bins).double()
        self.confidence_sums += torch.bincount(bins, confidence.double(), minlength=self.n_bins)
        self.correct_sums += torch.bincount(bins, (predicted == target).double(), minlength=self.n_bins)

    def compute(self) -> ReliabilityBins:
        return ReliabilityBins.from_sums(self.counts, self.confidence_sums, self.correct_sums)


def _model_metrics(num_classes: int, n_bins: int, confusion: bool) -> nn.ModuleDict:
    metrics: dict[str, nn.Module] = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),  # top-1 (macro is the default)
        "class_acc": MulticlassAccuracy(num_classes, average=None),
        "ece": MulticlassCalibrationError(num_classes, n_bins=n_bins, norm="l1"),
        "bins": ConfidenceBins(n_bins),
    }
    if confusion:
        metrics["confusion"] = MulticlassConfusionMatrix(num_classes)
    return nn.ModuleDict(metrics)


class DistillationDashboard(Callback):
    """Log the distillation dashboard (losses, agreement, KL, calibration, per-class accuracy, confusion)
    once per validation epoch, and draw its pictures as PNGs (and W&B images).

    Works for a :class:`~kd_lightning.modules.DistillationModule` (student and teacher) and for any
    classifier (student-only keys).

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
        self._temperature: float | None = None

    # -----------------------------------------------------------------------------------------
    # Hooks

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = not trainer.sanity_checking
        if self._active:
            self._reset(pl_module)

    @override
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._active:
            student, teacher = self._logits(pl_module, outputs, batch)
            self._update(pl_module, student, teacher, batch["target"])

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

    def _reset(self, pl_module: L.LightningModule) -> None:
        num_classes = int(getattr(pl_module, "num_outputs", None) or pl_module.num_classes)
        if self._metrics is None or num_classes != self._num_classes:
            self._num_classes = num_classes
            self._metrics = nn.ModuleDict(
                {
                    "student": _model_metrics(num_classes, self.n_bins, confusion=True),
                    "teacher": _model_metrics(num_classes, self.n_bins, confusion=False),
                    "agreement": MeanMetric(),
                    "kl_teacher_student": MeanMetric(),
                    "losses": nn.ModuleDict(),
                }
            )
        self._metrics.to(pl_module.device)
        self._temperature = None
        for metric in self._metrics.modules():
            if isinstance(metric, Metric):
                metric.reset()

    def _logits(
        self, pl_module: L.LightningModule, outputs: Any, batch: dict[str, Any]
    ) -> tuple[Tensor, Tensor | None]:
        if isinstance(outputs, dict) and "logits" in outputs:
            return outputs["logits"], outputs.get("teacher_logits")
        # A module whose step returns nothing: one more forward (eval mode, the loop's no-grad context).
        student = pl_module(batch["input"])
        teacher = batch.get("teacher_logits")
        if teacher is None and isinstance(getattr(pl_module, "teacher", None), nn.Module):
            teacher = pl_module.teacher(batch["input"])
        return student, teacher

    def _update(
        self, pl_module: L.LightningModule, student: Tensor, teacher: Tensor | None, target: Tensor
    ) -> None:
        assert self._metrics is not None
        m = self._metrics
        # fp32 whatever the Trainer's precision: softmax and KL in bf16 lose the small probabilities.
        student = student.detach().float()
        s_probs = student.softmax(-1)
        self._update_model(m["student"], s_probs, target)
        losses = {"hard": nn.functional.cross_entropy(student, target)}
        objective = getattr(pl_module, "objective", None)
        if teacher is not None:
            teacher = teacher.detach().float()
            t_probs = teacher.softmax(-1)
            self._update_model(m["teacher"], t_probs, target)
            m["agreement"].update((s_probs.argmax(-1) == t_probs.argmax(-1)).float())
            kl = (t_probs * (teacher.log_softmax(-1) - student.log_softmax(-1))).sum(-1)
            m["kl_teacher_student"].update(kl)
            if callable(objective):
                parts = objective(student, teacher, target, epoch=pl_module.current_epoch)
                self._temperature = getattr(objective, "temperature", None)
                losses.update({("total" if k == "loss" else k): v for k, v in parts.items()})
        losses.setdefault("total", losses["hard"])
        for name, value in losses.items():
            if name not in m["losses"]:
                m["losses"][name] = MeanMetric().to(student.device)
            m["losses"][name].update(value.detach().float(), weight=target.shape[0])

    @staticmethod
    def _update_model(metrics: nn.ModuleDict, probs: Tensor, target: Tensor) -> None:
        for metric in metrics.values():
            metric.update(probs, target)

    def _compute(self) -> tuple[dict[str, float], dict[str, Any]]:
        """Every metric's value (collective: every rank calls it), the scalars and what the pictures need."""
        assert self._metrics is not None
        m = self._metrics
        values: dict[str, float] = {}
        drawings: dict[str, Any] = {"bins": {}, "ece": {}, "class_acc": {}}
        for name, metric in m["losses"].items():
            values[f"loss_{name}"] = float(metric.compute())
        for side in ("student", "teacher"):
            metrics = m[side]
            if not metrics["acc"].update_called:
                continue
            values[f"{side}_acc"] = float(metrics["acc"].compute())
            values[f"{side}_ece"] = float(metrics["ece"].compute())
            class_acc = metrics["class_acc"].compute().cpu()
            drawings["class_acc"][side] = class_acc
            drawings["bins"][side] = metrics["bins"].compute()
            drawings["ece"][side] = values[f"{side}_ece"]
            if side == "student":
                drawings["confusion"] = metrics["confusion"].compute().cpu()
            for c, acc in enumerate(class_acc.tolist()):
                values[f"{side}_class_acc/{self._class_key(c)}"] = acc
        for name in ("agreement", "kl_teacher_student"):
            if m[name].update_called:
                values[name] = float(m[name].compute())
        if self._temperature is not None:
            values["temperature"] = float(self._temperature)
        for metric in m.modules():
            if isinstance(metric, Metric):
                metric.reset()
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
        datamodule = getattr(trainer, "datamodule", None)
        names = list(getattr(datamodule, "class_names", None) or [])
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
                title=f"reliability, validation, {epoch}",
                ece=drawings["ece"],
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
