"""LightningModules: a classifier (teacher / generalist / baseline) and a distillation module (student).

Both take their network as ``Callable[[input_shape, num_classes], nn.Module]`` (a ``class_path`` in
YAML whose first two arguments the CLI links from the DataModule), an optimizer callable and an
optional :class:`~kd_lightning.optim.Schedule`. The maths of distillation lives in
:mod:`kd_lightning.losses`; these classes only wire it to Lightning.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.cache.protocols import ClassCount, LiveTeacherNeed, TeacherCarrier
from kd_lightning.contracts import Batch, EvalOutput
from kd_lightning.features import FeatureTaps, feature_shapes
from kd_lightning.frozen import FrozenNetworks
from kd_lightning.models import checkpoint_weights
from kd_lightning.objectives import FeaturePairs, HintonKD, Objective
from kd_lightning.optim import Schedule

NetFactory = Callable[[tuple[int, ...], int], nn.Module]
STAGES = ("train", "val", "test")
# Key under which a checkpoint records the module class that wrote it, so a teacher checkpoint can
# be reloaded without the user naming its class.
CLASS_KEY = "kd_lightning_class"


class NonFiniteLossError(FloatingPointError):
    """A training loss came out NaN or infinite.

    Raised before the backward pass of that step (see :meth:`ClassifierBase.on_before_backward`):
    the weights are still those of the step before, and the run stops before any checkpoint
    callback can save a model trained on the bad value.
    """


class ClassifierBase(L.LightningModule):
    """What every classifier-shaped module shares: forward, evaluation, logging, optimizers, checkpoints.

    Every module that trains through it stops at the first non-finite training loss with a
    :class:`NonFiniteLossError` naming the global step and the batch's sample indices (``"index"``,
    the batch contract), whatever computed the loss: a corrupt soft target, a NaN input, a diverging
    optimizer.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, ...],
        optimizer: OptimizerCallable,
        lr_schedule: Schedule | None,
    ) -> None:
        super().__init__()
        if not (isinstance(num_classes, int) and num_classes >= 2):
            raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}.")
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.optimizer = optimizer
        self.lr_schedule = lr_schedule
        self.metrics = stage_metrics(num_classes)
        self._loss_sums: dict[str, dict[str, Tensor]] = {}
        self._loss_counts: dict[str, int] = {}
        self._batch_index: Tensor | None = None
        self._batch_idx = -1
        self.net: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return self.net.parameters()

    def validation_step(self, batch: Batch, batch_idx: int) -> EvalOutput:
        return self._eval_step("val", batch)

    def test_step(self, batch: Batch, batch_idx: int) -> EvalOutput:
        return self._eval_step("test", batch)

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        return {"index": batch["index"], "logits": self(batch["input"]).float()}

    def _eval_step(self, stage: str, batch: Batch) -> EvalOutput:
        """Accumulate the step's metrics and return its :class:`~kd_lightning.contracts.EvalOutput`
        (detached), which callbacks such as the dashboard and the clustering read (``outputs`` of
        ``on_validation_batch_end``) instead of running the model again."""
        logits = self(batch["input"])
        loss = nn.functional.cross_entropy(logits.float(), batch["target"])
        self._log_step(stage, {"loss": loss}, logits, batch["target"])
        return EvalOutput(logits=logits.detach(), target=batch["target"])

    def _log_step(
        self,
        stage: str,
        losses: dict[str, Tensor],
        logits: Tensor,
        target: Tensor,
        teacher_logits: Tensor | None = None,
    ) -> None:
        # Steps only accumulate: a `self.log` call costs ~0.6 ms and a metric forward ~0.35 ms, as much
        # as a small student's whole step. `_log_epoch` computes, logs and resets once per epoch; a
        # training step the loggers will write (every `log_every_n_steps`) also logs its own loss and lr.
        if stage == "train" and self._step_is_logged():
            self._log_training_step(losses["loss"])
        n = target.shape[0]
        sums = self._loss_sums.setdefault(stage, {})
        totals = {name: value.detach().float() * n for name, value in losses.items()}
        if teacher_logits is not None:
            # Counts beside the loss sums, averaged the same way at the epoch's end: two more torchmetrics
            # updates would cost ~0.4 ms a step, 1-2% of a small student's step with cached soft targets.
            teacher_top1 = teacher_logits.detach().argmax(-1)
            totals["teacher_acc"] = (teacher_top1 == target).sum().float()
            totals["agreement"] = (logits.detach().argmax(-1) == teacher_top1).sum().float()
        for name, total in totals.items():
            sums[name] = total if name not in sums else sums[name] + total
        self._loss_counts[stage] = self._loss_counts.get(stage, 0) + n
        self.metrics[f"{stage}_"]["acc"].update(logits.detach(), target)

    def _step_is_logged(self) -> bool:
        """Whether the loggers write this training step's metrics (Lightning's own rule: every
        ``log_every_n_steps`` optimizer steps, and the last); ``False`` outside a Trainer."""
        trainer = self._trainer
        return trainer is not None and trainer._logger_connector.should_update_logs

    def _log_training_step(self, loss: Tensor) -> None:
        """Log ``train/loss_step`` (this step's loss, on this process's batch) and ``train/lr`` (the learning
        rate of the first optimizer's first parameter group) at this step."""
        self.log("train/loss_step", loss.detach().float(), on_step=True, on_epoch=False)
        optimizers = self.trainer.optimizers
        if optimizers:
            self.log("train/lr", float(optimizers[0].param_groups[0]["lr"]), on_step=True, on_epoch=False)

    def _log_epoch(self, stage: str) -> None:
        """Log ``<stage>/<name>`` for every loss component and metric of the epoch, then reset them."""
        count = self._loss_counts.pop(stage, 0)
        for name, total in self._loss_sums.pop(stage, {}).items():
            self.log(f"{stage}/{name}", total / count, sync_dist=True)
        for name, metric in self.metrics[f"{stage}_"].items():
            # `compute()` is collective under DDP; every rank updated the same metrics.
            if metric.update_called:
                self.log(f"{stage}/{name}", metric.compute(), prog_bar=stage != "train" and name == "acc")
            metric.reset()

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        # A reference, not a copy: read only if this batch's loss is not finite.
        self._batch_index, self._batch_idx = batch["index"], batch_idx

    def on_before_backward(self, loss: Tensor) -> None:
        """Stop on a non-finite loss before it reaches the gradients (one scalar check per step).

        Raises:
            NonFiniteLossError: ``loss`` is NaN or infinite; the message names the global step, the
                epoch, the batch and its sample indices.
        """
        if not bool(torch.isfinite(loss.detach())):
            raise NonFiniteLossError(
                non_finite_loss_message(
                    float(loss.detach()),
                    self.trainer.global_step,
                    self.current_epoch,
                    self._batch_idx,
                    self._batch_index,
                )
            )

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self) -> Any:
        # Explicit over the trainable network only: a frozen teacher must never reach the optimizer.
        optimizer = self.optimizer(self.trainable_parameters())
        if self.lr_schedule is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        return {"optimizer": optimizer, "lr_scheduler": self.lr_schedule.build(optimizer, total, per_epoch)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CLASS_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"


class ClassifierModule(ClassifierBase):
    """Train and evaluate one classifier with cross-entropy: a teacher, a generalist or a baseline.

    Logs ``{train,val,test}/loss`` and ``{train,val,test}/acc`` (top-1, micro-averaged) per epoch, and every
    ``log_every_n_steps`` training steps ``train/loss_step`` and ``train/lr``.

    Args:
        net: network factory, e.g. ``kd_lightning.models.MLP`` with its ``init_args``.
        num_classes: linked from the DataModule.
        input_shape: linked from the DataModule.
        optimizer: optimizer factory over the network's parameters.
        lr_schedule: optional schedule built once the length of training is known.
        label_smoothing: label smoothing of the cross-entropy (note: teachers trained with it
            distil worse, Müller et al. 2019).
    """

    def __init__(
        self,
        net: NetFactory,
        num_classes: int,
        input_shape: tuple[int, ...],
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Schedule | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(num_classes, input_shape, optimizer, lr_schedule)
        self.save_hyperparameters()
        self.net = net(self.input_shape, num_classes)
        self.label_smoothing = label_smoothing

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        logits = self(batch["input"])
        loss = nn.functional.cross_entropy(
            logits.float(), batch["target"], label_smoothing=self.label_smoothing
        )
        self._log_step("train", {"loss": loss}, logits, batch["target"])
        return loss


# TeacherCarrier is subclassed, not only matched: on Python 3.12+ ``isinstance`` with a protocol looks
# members up statically, and a teacher held as a submodule is not found that way.
class DistillationModule(FrozenNetworks, ClassifierBase, TeacherCarrier, LiveTeacherNeed):
    """Train a student on a frozen teacher's soft targets (and the hard labels).

    The teacher is frozen by construction (:class:`~kd_lightning.frozen.FrozenNetworks`): it is in eval
    mode whatever ``train()`` is called with, its parameters have ``requires_grad=False``, the optimizer
    is built over the student only, and its weights are left out of the student's checkpoints (reloaded
    from ``teacher_ckpt`` instead).

    Logs, besides the classifier's keys, each component of the objective (``train/hard``,
    ``train/soft``, ...), ``train/temperature``, and on validation/test the objective's total
    (``kd_loss``) and components (``kd_hard``, ``kd_soft``, ...), ``teacher_acc`` and the
    teacher–student top-1 ``agreement``: the single source of these numbers (the dashboard does not
    recompute them).

    An objective on intermediate representations (``objective.layer_pairs``: FitNets hints, attention
    transfer) has the named layers of both networks (names within the student network and within the
    teacher's network, :func:`network_of`) captured during each step's forward passes (hooks
    registered for the pass and removed after it, :mod:`kd_lightning.features`); its ``adapters``
    (FitNets' regressors) are built here from the features' shapes, as the submodule ``adapters``: they
    train with the student (``trainable_parameters``) and are saved in its checkpoints. Such an objective
    needs the live teacher: soft targets from a store are refused (:meth:`live_teacher_reason`).

    Args:
        student: network factory for the student.
        num_classes: linked from the DataModule.
        input_shape: linked from the DataModule.
        teacher_ckpt: path of a teacher checkpoint written by this package (e.g. by a
            :class:`ClassifierModule` run); loaded on construction.
        teacher: a teacher module given directly (Python API, or a ``class_path`` in YAML, e.g. an
            ensemble). Exclusive with ``teacher_ckpt``. With neither, the module can evaluate and
            predict but not train (soft targets may come from a store instead).
        objective: the distillation method; default :class:`~kd_lightning.objectives.HintonKD`.
        optimizer: optimizer factory over the student's parameters.
        lr_schedule: optional schedule.

    Raises:
        FileNotFoundError: ``teacher_ckpt`` does not exist.
        ValueError: teacher and student disagree on the number of classes, or both teacher
            arguments are given.
    """

    def __init__(
        self,
        student: NetFactory,
        num_classes: int,
        input_shape: tuple[int, ...],
        teacher_ckpt: str | None = None,
        teacher: nn.Module | None = None,
        objective: Objective | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Schedule | None = None,
    ) -> None:
        super().__init__(num_classes, input_shape, optimizer, lr_schedule)
        self.save_hyperparameters(ignore=["teacher"])
        self.net = student(self.input_shape, num_classes)
        self.objective = objective if objective is not None else HintonKD()
        if teacher is not None and teacher_ckpt is not None:
            raise ValueError("give the teacher once: either `teacher` or `teacher_ckpt`, not both.")
        self.teacher: nn.Module | None = None
        # The objective's trainable modules (FitNets' regressors), one per layer pair; built with the teacher.
        self.adapters = nn.ModuleList()
        self._student_taps: FeatureTaps | None = None
        self._teacher_taps: FeatureTaps | None = None
        if self.objective.layer_pairs:
            names = [s for s, _ in self.objective.layer_pairs]
            self._student_taps = FeatureTaps.of(self.net, names, "objective.student_layers")
        if teacher_ckpt is not None:
            teacher = load_teacher(teacher_ckpt)
        if teacher is not None:
            self.set_teacher(teacher)

    @property
    def student(self) -> nn.Module:
        return self.net

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The student's parameters and its objective's adapters' (never the teacher's)."""
        return itertools.chain(self.net.parameters(), self.adapters.parameters())

    def live_teacher_reason(self) -> str | None:
        """Why this module's training needs its teacher's forward pass rather than stored soft targets, or
        ``None`` when stored logits suffice."""
        if not self.objective.layer_pairs:
            return None
        return (
            f"the objective {type(self.objective).__name__} compares intermediate features of the teacher "
            f"(layer pairs {list(self.objective.layer_pairs)}), which a soft-target store does not hold: they are "
            "computed live, by the teacher's forward pass at every step. Remove the SoftTargetCache callback "
            "and give the teacher (`teacher_ckpt`)."
        )

    def _bind_teacher_features(self) -> None:
        """Tap the teacher's layers and build the adapters from both networks' feature shapes."""
        if not self.objective.layer_pairs or self.teacher is None or self._student_taps is None:
            return
        names = [t for _, t in self.objective.layer_pairs]
        network = network_of(self.teacher)
        self._teacher_taps = FeatureTaps.of(network, names, "objective.teacher_layers")
        if len(self.adapters) == 0:
            student = feature_shapes(self.net, self._student_taps, self.input_shape)
            teacher = feature_shapes(network, self._teacher_taps, self.input_shape)
            self.adapters = nn.ModuleList(self.objective.adapters(student, teacher))

    def _forward_with_teacher(self, batch: Batch) -> tuple[Tensor, Tensor, FeaturePairs]:
        """The student's logits, the teacher's, and the objective's feature pairs (empty for an objective on
        logits only): student features through their adapters, teacher features, as the forward passes
        returned them (the losses upcast to fp32)."""
        if self._student_taps is None:
            return self(batch["input"]), self.teacher_logits(batch), ()
        reason = self.live_teacher_reason()
        if "teacher_logits" in batch:
            raise RuntimeError(f"batch['teacher_logits'] came from a soft-target store, but {reason}")
        if self._teacher_taps is None:
            raise RuntimeError(
                "DistillationModule has no teacher, and its objective compares the teacher's intermediate "
                "features: pass `teacher_ckpt` (or `teacher`)."
            )
        with self._student_taps.capture() as student:
            logits = self(batch["input"])
        with self._teacher_taps.capture() as teacher:
            teacher_logits = self.teacher_logits(batch)
        pairs = [(adapt(s), t) for adapt, s, t in zip(self.adapters, student, teacher, strict=True)]
        return logits, teacher_logits, pairs

    def set_teacher(self, teacher: nn.Module) -> None:
        """Attach ``teacher`` frozen, after checking it predicts this module's number of classes."""
        teacher.eval()
        classes = teacher_num_classes(teacher, self.input_shape)
        if classes != self.num_classes:
            raise ValueError(
                f"teacher and student disagree on the number of classes: the teacher outputs {classes} "
                f"logits but `num_classes` (student, from the data) is {self.num_classes}."
            )
        self.freeze("teacher", teacher)
        self._bind_teacher_features()

    def teacher_logits(self, batch: Batch) -> Tensor:
        """The teacher's logits for ``batch``: ``batch["teacher_logits"]`` when something upstream (the
        soft-target cache) put them there, else a forward pass of the teacher."""
        if "teacher_logits" in batch:
            return batch["teacher_logits"]
        if self.teacher is None:
            raise RuntimeError(
                "DistillationModule has no teacher: pass `teacher_ckpt` (or `teacher`), or supply "
                "batch['teacher_logits'] (e.g. with the SoftTargetCache callback)."
            )
        # no_grad, not inference_mode: the result is used as a loss target.
        with torch.no_grad():
            return self.teacher(batch["input"])

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        logits, teacher_logits, features = self._forward_with_teacher(batch)
        losses = self.objective(logits, teacher_logits, batch["target"], self.current_epoch, features)
        self._log_step("train", losses, logits, batch["target"], teacher_logits)
        return losses["loss"]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # Rebuilt without its teacher (e.g. as a teacher itself, `load_teacher`), the module has no adapters:
        # they only serve the training loss, so their saved weights are not needed.
        if len(self.adapters) == 0:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("adapters.")]:
                del state[key]

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.objective.temperature is not None:
            self.log("train/temperature", float(self.objective.temperature))

    def _eval_step(self, stage: str, batch: Batch) -> EvalOutput:
        target = batch["target"]
        teacher_logits = None
        if self.teacher is not None or "teacher_logits" in batch:
            logits, teacher_logits, features = self._forward_with_teacher(batch)
        else:
            logits = self(batch["input"])
        losses = {"loss": nn.functional.cross_entropy(logits.float(), target)}
        out = EvalOutput(logits=logits.detach(), target=target)
        if teacher_logits is not None:
            parts = self.objective(logits, teacher_logits, target, self.current_epoch, features)
            # The objective's total as `kd_loss`, each other component as `kd_<name>`.
            losses.update({f"kd_{name}": value for name, value in parts.items()})
            out["teacher_logits"] = teacher_logits.detach()
        self._log_step(stage, losses, logits, target, teacher_logits)
        return out


def network_of(model: nn.Module) -> nn.Module:
    """The network whose layer names a feature objective uses: a module's ``net`` (a teacher loaded from a
    checkpoint is a :class:`ClassifierBase`), any other ``nn.Module`` itself.

    Example:
        >>> net = nn.Linear(2, 3)
        >>> network_of(net) is net
        True
    """
    return model.net if isinstance(model, ClassifierBase) else model


def non_finite_loss_message(
    value: float, global_step: int, epoch: int, batch_idx: int, index: Tensor | None
) -> str:
    """What :class:`NonFiniteLossError` says: where the loss went bad, and on which samples.

    Example:
        >>> non_finite_loss_message(float("nan"), 13, 1, 5, torch.tensor([20, 21]))[:72]
        'non-finite training loss (nan) at global step 13 (epoch 1, batch 5), on '
    """
    samples = "unknown samples" if index is None else f"the samples with index {index.tolist()}"
    return (
        f"non-finite training loss ({value}) at global step {global_step} (epoch {epoch}, batch {batch_idx}), "
        f"on {samples} (batch['index']). The run stops before this step's backward pass: the weights "
        "are those of the step before, and no checkpoint is saved from this state. Look for NaN or inf "
        "in these samples' inputs and soft targets (a corrupt soft-target store, a diverged teacher), "
        "or lower the learning rate."
    )


def stage_metrics(num_classes: int) -> nn.ModuleDict:
    """One set of metric states per stage (torchmetrics objects must not be shared between loops).

    Keys are ``"<stage>_"``: a ModuleDict key may not shadow a Module attribute such as ``train``. A
    distilling module's ``teacher_acc`` and ``agreement`` are counts kept beside its loss sums instead.
    """

    def make() -> nn.ModuleDict:
        return nn.ModuleDict({"acc": MulticlassAccuracy(num_classes, average="micro")})

    return nn.ModuleDict({f"{stage}_": make() for stage in STAGES})


def teacher_num_classes(teacher: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Number of logits ``teacher`` produces: its ``num_classes`` where it records one (a
    :class:`~kd_lightning.cache.protocols.ClassCount` with an integer), else from one dummy forward pass.

    Example:
        >>> teacher_num_classes(nn.Linear(4, 3), (4,))  # no ``num_classes``: one forward pass
        3
    """
    if isinstance(teacher, ClassCount) and isinstance(teacher.num_classes, int):
        return teacher.num_classes
    param = next(teacher.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.no_grad():
        out = teacher(torch.zeros(1, *input_shape, device=device))
    return int(out.shape[-1])


def load_teacher(path: str | Path) -> L.LightningModule:
    """Load a frozen teacher from a checkpoint written by one of this package's modules.

    The checkpoint names the module class that wrote it; that class rebuilds the network from the
    saved hyperparameters.

    Raises:
        FileNotFoundError: no file at ``path`` (the message names ``teacher_ckpt``).
        ValueError: the file is not a kd-lightning checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`teacher_ckpt`: no checkpoint file at {str(path)!r}.")
    # mmap: reading the header must not pull the whole teacher into memory a second time.
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # any unreadable file: say which argument pointed at it
        raise ValueError(f"`teacher_ckpt`: cannot read {str(path)!r} as a checkpoint: {err}") from err
    class_path = checkpoint.get(CLASS_KEY) if isinstance(checkpoint, dict) else None
    if class_path is None:
        raise ValueError(
            f"`teacher_ckpt`: {str(path)!r} is not a kd-lightning checkpoint (no {CLASS_KEY!r} entry); "
            "pass the teacher as a module with `teacher` instead."
        )
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    # A distilled student can teach in turn; its own teacher is not needed for that. Lightning drops
    # keyword arguments a class does not take, so this is harmless for a ClassifierModule.
    # weights_only=False: hyperparameters may hold network factories (classes, partials); a teacher
    # checkpoint is code you chose to run, like any pickle.
    # The checkpoint's weights replace pretrained ones: networks are built without them (no download).
    with checkpoint_weights():
        teacher = cls.load_from_checkpoint(path, map_location="cpu", weights_only=False, teacher_ckpt=None)
    return teacher.eval().requires_grad_(False)
