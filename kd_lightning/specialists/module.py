"""Training one specialist (Hinton, Vinyals & Dean 2015, section 5): :class:`SpecialistModule`, and
:func:`load_specialist` to reload one for inference from its checkpoint alone.

A specialist classifies one group of confusable classes plus one *dustbin* class for all others. Its
network is its own (``net``, any class by ``class_path``: the generalist's architecture or another, e.g. a
smaller one); it starts from the generalist's weights where the architectures match
(:mod:`~kd_lightning.specialists.initialisation`) or from scratch (``init_from``), trains on
batches that over-represent its group, and corrects its dustbin logit for that oversampling afterwards
(:func:`~kd_lightning.specialists.sampling.dustbin_correction`). Its classes belong to the data: the
DataModule resolves them (groups file and group, or explicit classes), relabels the batches, and ``kd``
links them into the module the way it links ``num_classes``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from kd_lightning.contracts import Batch, EvalOutput
from kd_lightning.frozen import FrozenNetworks
from kd_lightning.losses import check_temperature, check_weight, soft_target_loss
from kd_lightning.models import checkpoint_weights
from kd_lightning.modules import CLASS_KEY, ClassifierBase, NetFactory, load_teacher, stage_metrics
from kd_lightning.optim import Schedule
from kd_lightning.specialists.combination import fold_log_probs
from kd_lightning.specialists.initialisation import head_layer, head_outputs, init_from_generalist
from kd_lightning.specialists.sampling import GroupSampling, SpecialistData, check_classes

# Checkpoint entry naming the group a specialist was trained for, so an ensemble can refuse a
# checkpoint trained for another group or another label space.
SPECIALIST_KEY = "kd_lightning_specialist"


def load_generalist(path: str) -> ClassifierBase:
    """The generalist of ``generalist_ckpt``, frozen: a classifier of this package with a ``net``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a kd-lightning checkpoint, or not one of a classifier.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"`generalist_ckpt`: no checkpoint file at {str(path)!r}.")
    try:
        generalist = load_teacher(path)
    except ValueError as err:  # load_teacher names its own argument; say which one the user gave
        raise ValueError(str(err).replace("`teacher_ckpt`", "`generalist_ckpt`")) from err
    if not isinstance(generalist, ClassifierBase):
        raise ValueError(
            f"`generalist_ckpt`: {str(path)!r} holds a {type(generalist).__name__}, expected a classifier "
            "(ClassifierModule, DistillationModule) whose `net` a specialist can copy."
        )
    return generalist


INIT_FROM = ("generalist", "scratch")
"""Where a specialist's weights may start (:class:`SpecialistModule`'s ``init_from``)."""


def _initialisation(init_from: str | None, generalist_ckpt: str | None) -> str:
    """``init_from`` resolved: ``None`` means the generalist when one is given, else scratch.

    Example:
        >>> _initialisation(None, "g.ckpt"), _initialisation(None, None), _initialisation("scratch", "g.ckpt")
        ('generalist', 'scratch', 'scratch')
    """
    if init_from is not None and init_from not in INIT_FROM:
        raise ValueError(f"`init_from` must be one of {', '.join(INIT_FROM)} (or null), got {init_from!r}.")
    if init_from == "generalist" and generalist_ckpt is None:
        raise ValueError(
            "`init_from`='generalist' needs the generalist: pass `generalist_ckpt`, or `init_from: scratch`."
        )
    if init_from is None:
        return "generalist" if generalist_ckpt is not None else "scratch"
    return init_from


class SpecialistModule(FrozenNetworks, ClassifierBase):
    """One specialist: a classifier over one group's classes plus a dustbin class for all the others.

    Its ``classes`` come from the data (under ``kd``, linked from
    :class:`~kd_lightning.datamodules.SpecialistDataModule` with ``group`` and ``groups_file``; in
    Python, given explicitly). Its network ``net`` is its own: the generalist's architecture or any other
    (a smaller MLP, another family), whose head gets ``G + 1`` outputs. ``init_from`` says where its weights
    start: ``"generalist"`` copies ``generalist_ckpt``'s weights and its group's head rows (see
    :func:`~kd_lightning.specialists.initialisation.init_from_generalist`), which needs the same
    architecture up to the head's size (otherwise a ``ValueError`` names the parameters that differ);
    ``"scratch"`` keeps the network's own random initialisation, whatever its architecture (a generalist
    given then only serves the soft targets). Training uses the raw logits
    against ``batch["specialist_target"]``, which the DataModule adds; ``forward`` and evaluation add the
    dustbin correction, which is computed at the start of fitting from the DataModule's
    ``group_sampling`` (:class:`~kd_lightning.specialists.sampling.SpecialistData`; none, or a DataModule
    without it, means natural sampling, correction 0) and saved in the checkpoint as the buffer
    ``dustbin_shift``.

    With ``soft_weight > 0`` the loss adds the generalist's soft targets folded onto the specialist's
    labels (the paper's section 6 proposal against overfitting): ``(1 - w) * CE + w * T^2 KL``. The
    folded targets are moved to the training batches' prior (dustbin logit minus the correction), so the
    one correction at inference serves both terms. The generalist is then frozen
    (:class:`~kd_lightning.frozen.FrozenNetworks`) and left out of the checkpoints.

    Logs ``{train,val,test}/loss`` and ``/acc`` over the ``G + 1`` specialist labels, and on training
    ``train/hard`` and ``train/soft`` when soft targets are used. Validation and test return an
    :class:`~kd_lightning.contracts.EvalOutput` over the ``G + 1`` labels.

    Args:
        net: network factory, the specialist's own architecture (its head gets ``G + 1`` outputs).
        num_classes: full label space, linked from the DataModule.
        input_shape: linked from the DataModule.
        classes: the group's classes, linked from the DataModule's ``group_classes``.
        group: the group's id in its groups file (recorded in the checkpoint, so that an ensemble can
            check it), linked from the DataModule.
        groups_file: the groups file the classes came from, if any: recorded in the checkpoint and as a
            run input, never read here; linked from the DataModule.
        generalist_ckpt: checkpoint of the generalist to start from (and take soft targets from).
        init_from: ``"generalist"`` (needs ``generalist_ckpt`` and the generalist's architecture up to the
            head) or ``"scratch"``; ``None``: from the generalist when ``generalist_ckpt`` is given, else
            from scratch.
        soft_weight: weight ``w`` in ``[0, 1]`` of the generalist's soft targets.
        temperature: temperature of the soft-target term.
        optimizer: optimizer factory over the specialist's parameters.
        lr_schedule: optional schedule.

    Raises:
        ValueError: no ``classes``; the group leaves no class for the dustbin or has ids outside the
            label space; ``soft_weight > 0`` without a generalist; a generalist for another number of
            classes; ``init_from="generalist"`` without a generalist, or with a ``net`` whose parameters
            differ from the generalist's (the message names them); an unknown ``init_from``; at ``setup``,
            a DataModule whose group is not ``classes``.
        FileNotFoundError: ``generalist_ckpt`` does not exist.
    """

    def __init__(
        self,
        net: NetFactory,
        num_classes: int,
        input_shape: tuple[int, ...],
        classes: list[int] | None = None,
        group: int = 0,
        groups_file: str | None = None,
        generalist_ckpt: str | None = None,
        init_from: Literal["generalist", "scratch"] | None = None,
        soft_weight: float = 0.0,
        temperature: float = 2.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Schedule | None = None,
    ) -> None:
        super().__init__(num_classes, input_shape, optimizer, lr_schedule)
        self.save_hyperparameters()
        check_weight(soft_weight, "soft_weight")
        check_temperature(temperature)
        if classes is None:
            raise ValueError(
                "`classes` is missing: a specialist takes its group's classes from its data. Give them "
                "(e.g. `SpecialistDataModule(...).group_classes`), or run `kd` with a SpecialistDataModule "
                "(its `groups_file`/`group` or `classes`), which links them into the model."
            )
        check_classes(classes, num_classes)
        self.group = group
        self.group_classes = [int(c) for c in classes]
        self.soft_weight = soft_weight
        self.temperature = temperature
        self.register_buffer("classes", torch.tensor(self.group_classes, dtype=torch.long))
        self.register_buffer("dustbin_shift", torch.zeros(()))
        self.metrics = stage_metrics(len(self.group_classes) + 1)
        self.net = net(self.input_shape, len(self.group_classes) + 1)
        head_name, head = head_layer(self.net)
        if head_outputs(head) != len(self.group_classes) + 1:
            raise ValueError(
                f"`net`'s head ({head_name!r}) outputs {head_outputs(head)} features, but the head "
                f"must output the logits ({len(self.group_classes) + 1} for this specialist)."
            )
        self.generalist: ClassifierBase | None = None
        start = _initialisation(init_from, generalist_ckpt)
        if generalist_ckpt is not None:
            generalist = load_generalist(generalist_ckpt)
            if generalist.num_classes != num_classes:
                raise ValueError(
                    f"`generalist_ckpt` predicts {generalist.num_classes} classes, but num_classes={num_classes}."
                )
            if start == "generalist":
                try:
                    init_from_generalist(self.net, generalist.net, self.group_classes)
                except ValueError as err:  # name the argument and the way out
                    raise ValueError(
                        f"`init_from`='generalist': {err} Give `init_from: scratch` to train this `net` from "
                        "its own initialisation."
                    ) from err
            if soft_weight > 0:
                self.freeze("generalist", generalist)
        elif soft_weight > 0:
            raise ValueError(f"`soft_weight`={soft_weight} > 0 needs the generalist: pass `generalist_ckpt`.")

    @property
    def num_outputs(self) -> int:
        return len(self.group_classes) + 1

    def raw_logits(self, x: Tensor) -> Tensor:
        """Logits as trained, under the oversampled batches' prior."""
        return self.net(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits under the data's prior: the dustbin logit plus the oversampling correction."""
        logits = self.net(x)
        shift = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        shift[-1] = self.dustbin_shift
        return logits + shift

    @staticmethod
    def specialist_target(batch: Batch) -> Tensor:
        """``batch["specialist_target"]``: the data relabels, this module only reads.

        Raises:
            KeyError: the batch has no ``specialist_target`` (its DataModule is not a specialist's).
        """
        if "specialist_target" not in batch:
            raise KeyError(
                "the batch has no 'specialist_target': a SpecialistModule trains and evaluates on a "
                "SpecialistDataModule (`oversample=None` samples naturally), which relabels its batches."
            )
        return batch["specialist_target"]

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule
        if isinstance(data, SpecialistData) and list(data.group_classes) != self.group_classes:
            action = "oversamples" if data.group_sampling is not None else "relabels by"
            raise ValueError(
                f"the DataModule {action} classes {list(data.group_classes)}, but this specialist is for "
                f"group {self.group} = {self.group_classes}."
            )

    def on_fit_start(self) -> None:
        data = self.trainer.datamodule
        self._set_correction(data.group_sampling if isinstance(data, SpecialistData) else None)

    def _set_correction(self, sampling: GroupSampling | None) -> None:
        if sampling is None:  # natural sampling: the training prior is the data's
            self.dustbin_shift.zero_()
            return
        if list(sampling.classes) != self.group_classes:
            raise ValueError(
                f"the DataModule oversamples classes {list(sampling.classes)}, but this specialist is for "
                f"group {self.group} = {self.group_classes}."
            )
        self.dustbin_shift.fill_(sampling.correction)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        logits = self.raw_logits(batch["input"])
        target = self.specialist_target(batch)
        hard = F.cross_entropy(logits.float(), target)
        losses = {"loss": hard}
        if self.generalist is not None and self.soft_weight > 0:
            # no_grad, not inference_mode: the result is a loss target.
            with torch.no_grad():
                folded = fold_log_probs(
                    F.log_softmax(self.generalist(batch["input"]).float(), -1), self.classes
                )
                folded[:, -1] -= self.dustbin_shift
            soft = soft_target_loss(logits, folded, self.temperature)
            losses = {
                "loss": (1 - self.soft_weight) * hard + self.soft_weight * soft,
                "hard": hard,
                "soft": soft,
            }
        self._log_step("train", losses, logits, target)
        return losses["loss"]

    def _eval_step(self, stage: str, batch: Batch) -> EvalOutput:
        logits = self(batch["input"])
        target = self.specialist_target(batch)
        self._log_step(stage, {"loss": F.cross_entropy(logits.float(), target)}, logits, target)
        return {"logits": logits.detach(), "target": target}

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        return {"index": batch["index"], "logits": self(batch["input"]).float()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # the class, and no frozen generalist
        checkpoint[SPECIALIST_KEY] = {
            "group": self.group,
            "classes": self.group_classes,
            "num_classes": self.num_classes,
            "groups_file": self.hparams.get("groups_file"),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # Checkpoints written before the data owned the relabelling carry the model's old label map.
        checkpoint["state_dict"].pop("label_map", None)


def load_specialist(path: str | Path) -> SpecialistModule:
    """Load a trained specialist for inference, from its checkpoint alone.

    The group's classes come from the checkpoint, so neither the groups file nor the generalist
    checkpoint has to exist any more.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a specialist checkpoint of this package.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`specialist_ckpts`: no checkpoint file at {str(path)!r}.")
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    info = checkpoint.get(SPECIALIST_KEY) if isinstance(checkpoint, dict) else None
    if info is None:
        raise ValueError(
            f"`specialist_ckpts`: {str(path)!r} is not a specialist checkpoint (no {SPECIALIST_KEY!r} entry; "
            f"written by {checkpoint.get(CLASS_KEY) if isinstance(checkpoint, dict) else 'something else'})."
        )
    with checkpoint_weights():  # the checkpoint's weights replace any pretrained ones
        module = SpecialistModule.load_from_checkpoint(
            path,
            map_location="cpu",
            weights_only=False,
            classes=info["classes"],
            group=info["group"],
            groups_file=info.get("groups_file"),
            generalist_ckpt=None,
            init_from="scratch",  # the checkpoint holds the trained weights
            soft_weight=0.0,
        )
    return module.eval().requires_grad_(False)
