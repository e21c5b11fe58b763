"""Ensembles of classifiers: the combination rules, an ``Ensemble`` module usable as a teacher, and an
evaluation module (accuracy, NLL, calibration, cost).

Three combination rules, each returning the ensemble's log-probabilities ``(N, C)`` from the members'
logits ``(M, N, C)``:

- ``mean_probs``: the arithmetic mean of the members' probabilities (Hinton et al.'s ensemble; the
  usual deep-ensemble rule).
- ``mean_logits``: the softmax of the mean of the members' logits.
- ``geometric``: the renormalised geometric mean of the members' probabilities. For softmax members it
  is *the same distribution* as ``mean_logits`` (the members' log-normalisers are constants per row and
  cancel in the renormalisation); both names are kept because both are in use, and the tests check the
  identity.

Used as a teacher, an :class:`Ensemble`'s output is a log-probability vector; a temperature ``T``
then softens the ensemble's distribution, ``softmax(log p / T)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.calibration import ECE_BINS, calibration_error, expected_calibration_error
from kd_lightning.contracts import Batch, EvalOutput, HasInputShape
from kd_lightning.costs import forward_flops
from kd_lightning.frozen import FrozenNetworks
from kd_lightning.modules import ClassifierBase, load_teacher, teacher_num_classes
from kd_lightning.parallel import MemberPool

Rule = Literal["mean_probs", "mean_logits", "geometric"]


def _mean_probs(logits: Tensor) -> Tensor:
    # log(mean_m p_m) computed as a logsumexp so that tiny probabilities do not underflow.
    return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=0) - math.log(logits.shape[0])


def _mean_logits(logits: Tensor) -> Tensor:
    return F.log_softmax(logits.mean(dim=0), dim=-1)


def _geometric(logits: Tensor) -> Tensor:
    return F.log_softmax(F.log_softmax(logits, dim=-1).mean(dim=0), dim=-1)


RULES: dict[str, Callable[[Tensor], Tensor]] = {
    "mean_probs": _mean_probs,
    "mean_logits": _mean_logits,
    "geometric": _geometric,
}


def check_rule(rule: str) -> None:
    """Raise ``ValueError`` naming the known rules when ``rule`` is not one of them."""
    if rule not in RULES:
        raise ValueError(f"`rule` must be one of {sorted(RULES)}, got {rule!r}.")


def combine_logits(logits: Tensor, rule: str = "mean_probs") -> Tensor:
    """Combine the members' logits into the ensemble's log-probabilities, in fp32.

    Args:
        logits: ``(M, N, C)``: ``M`` members, ``N`` samples, ``C`` classes.
        rule: ``"mean_probs"``, ``"mean_logits"`` or ``"geometric"`` (see the module docstring).

    Raises:
        ValueError: unknown ``rule``, or ``logits`` not 3-dimensional with at least one member.

    Example:
        >>> z = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])  # two members, one sample, two classes
        >>> combine_logits(z, "mean_probs").exp()  # mean of (0.881, 0.119) and (0.5, 0.5)
        tensor([[0.6904, 0.3096]])
        >>> combine_logits(z, "mean_logits").exp()  # softmax of (1, 0)
        tensor([[0.7311, 0.2689]])
    """
    check_rule(rule)
    if logits.dim() != 3 or logits.shape[0] == 0:
        raise ValueError(
            f"`logits` must be (members, samples, classes) with members >= 1, got {tuple(logits.shape)}."
        )
    return RULES[rule](logits.float())


def disagreement(logits: Tensor) -> float:
    """Share of samples on which the members' top-1 predictions are not all the same.

    Args:
        logits: ``(M, N, C)``: ``M >= 2`` members, ``N >= 1`` samples, ``C`` classes.

    Returns:
        The fraction of the ``N`` samples where at least one member's argmax differs from another's.

    Raises:
        ValueError: ``logits`` not 3-dimensional, or fewer than two members or no samples.

    Example:
        >>> z = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])  # 2 members, 2 samples
        >>> disagreement(z)  # they agree on the first sample, not on the second
        0.5
    """
    if logits.dim() != 3 or logits.shape[0] < 2 or logits.shape[1] == 0:
        raise ValueError(
            f"`logits` must be (members, samples, classes) with members >= 2 and samples >= 1, "
            f"got {tuple(logits.shape)}."
        )
    top1 = logits.argmax(-1)
    return float((top1 != top1[:1]).any(dim=0).float().mean())


def classification_metrics(log_probs: Tensor, target: Tensor, n_bins: int = ECE_BINS) -> dict[str, float]:
    """Accuracy, mean negative log-likelihood and ECE (:mod:`kd_lightning.calibration`) of predicted
    log-probabilities ``(N, C)``."""
    log_probs = log_probs.float()
    return {
        "acc": float((log_probs.argmax(-1) == target).float().mean()),
        "nll": float(F.nll_loss(log_probs, target)),
        "ece": expected_calibration_error(log_probs.exp(), target, n_bins),
    }


class Ensemble(nn.Module):
    """Members combined by one rule; its forward returns the ensemble's log-probabilities.

    An ``Ensemble`` is an ordinary module, so it is a teacher wherever a teacher is accepted: pass it as
    :class:`~kd_lightning.modules.DistillationModule`'s ``teacher`` (in YAML, a ``class_path`` with
    ``checkpoints``), live or through :class:`~kd_lightning.callbacks.SoftTargetCache`.

    Args:
        checkpoints: member checkpoints written by this package (e.g. by ``scripts/train_members.py``).
        members: member modules given directly (Python API); exclusive with ``checkpoints``.
        rule: ``"mean_probs"``, ``"mean_logits"`` or ``"geometric"``.
        input_shape: shape of one input; needed only when the members do not record it themselves.

    Raises:
        ValueError: no members, both or neither of ``checkpoints``/``members``, an unknown rule, or
            members that disagree on the input shape or the number of classes.
        FileNotFoundError: a checkpoint is missing.

    Example:
        >>> ens = Ensemble(members=[nn.Linear(4, 3), nn.Linear(4, 3)], input_shape=(4,))
        >>> p = ens(torch.zeros(2, 4)).exp()  # log-probabilities: each row sums to 1 (to fp32 rounding)
        >>> torch.allclose(p.sum(-1), torch.ones(2), rtol=0, atol=3 * torch.finfo(p.dtype).eps)
        True
    """

    def __init__(
        self,
        checkpoints: list[str] | None = None,
        members: Sequence[nn.Module] | None = None,
        rule: Rule = "mean_probs",
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        check_rule(rule)
        if (checkpoints is None) == (members is None):
            raise ValueError("give the members once: either `checkpoints` or `members`.")
        if checkpoints is not None:
            members = [_load_member(i, path) for i, path in enumerate(checkpoints)]
        assert members is not None
        if len(members) == 0:
            raise ValueError("`members` is empty: an ensemble needs at least one member.")
        self.rule = rule
        self.checkpoints = [str(Path(p)) for p in checkpoints] if checkpoints is not None else None
        self.input_shape = _common_input_shape(members, input_shape)
        self.num_classes = _common_num_classes(members, self.input_shape)
        self.members = nn.ModuleList(members)

    def member_logits(self, x: Tensor, pool: MemberPool | None = None) -> Tensor:
        """``(M, N, C)`` logits of every member, in fp32: one after another, or by the worker processes of
        ``pool`` (a :class:`~kd_lightning.parallel.MemberPool` of :attr:`members`, in order), with the same
        values."""
        if pool is not None:
            return torch.stack(pool.run(x))
        return torch.stack([member(x).float() for member in self.members])

    def forward(self, x: Tensor) -> Tensor:
        return combine_logits(self.member_logits(x), self.rule)

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}, members={len(self.members)}, num_classes={self.num_classes}"


def _load_member(i: int, path: str) -> nn.Module:
    if not Path(path).is_file():
        raise FileNotFoundError(f"`checkpoints[{i}]`: no checkpoint file at {str(path)!r}.")
    return load_teacher(path)


def _common_input_shape(members: Sequence[nn.Module], given: tuple[int, ...] | None) -> tuple[int, ...]:
    shapes: dict[int | str, tuple[int, ...]] = {
        i: tuple(m.input_shape)
        for i, m in enumerate(members)
        if isinstance(m, HasInputShape) and m.input_shape
    }
    if given is not None:
        shapes = {**shapes, "input_shape": tuple(given)}
    if not shapes:
        raise ValueError("`input_shape` is needed: none of the members records the shape of its input.")
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in shapes.items())
        raise ValueError(f"ensemble members disagree on the input shape ({listing}).")
    return next(iter(shapes.values()))


def _common_num_classes(members: Sequence[nn.Module], input_shape: tuple[int, ...]) -> int:
    classes = [teacher_num_classes(m, input_shape) for m in members]
    if len(set(classes)) > 1:
        listing = ", ".join(f"member {i}: {c}" for i, c in enumerate(classes))
        raise ValueError(f"ensemble members disagree on the number of classes ({listing}).")
    return classes[0]


class EnsembleModule(FrozenNetworks, ClassifierBase):
    """Evaluate an ensemble with ``kd test`` / ``kd validate``: accuracy, NLL, calibration and cost.

    Logs ``{val,test}/acc`` (top-1), ``/loss`` (NLL of the combined distribution), ``/ece`` (top-label,
    15 bins, :mod:`kd_lightning.calibration`), ``/member_acc_<i>`` and ``/member_acc_mean``, and
    ``/flops_per_example`` (all members, by PyTorch's FLOP counter). Its steps return the
    :class:`~kd_lightning.contracts.EvalOutput` of every module, with the ensemble's log-probabilities
    as ``logits``.

    It only evaluates, so the ensemble is held frozen (:class:`~kd_lightning.frozen.FrozenNetworks`):
    eval mode, no gradients, and its members' weights are left out of the module's checkpoints (they
    are reloaded from ``checkpoints``, like a student's teacher).

    Args:
        num_classes: linked from the DataModule; must match the members'.
        input_shape: linked from the DataModule; must match the members'.
        checkpoints: member checkpoints.
        rule: the combination rule.

    Raises:
        ValueError: as :class:`Ensemble`, or the members' number of classes differs from the data's.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, ...],
        checkpoints: list[str],
        rule: Rule = "mean_probs",
    ) -> None:
        super().__init__(num_classes, input_shape, optimizer=None, lr_schedule=None)
        self.save_hyperparameters()
        self.freeze("net", Ensemble(checkpoints=checkpoints, rule=rule, input_shape=self.input_shape))
        if self.net.num_classes != num_classes:
            raise ValueError(
                f"the ensemble's members output {self.net.num_classes} classes but `num_classes` (from the "
                f"data) is {num_classes}."
            )
        self.flops_per_example = forward_flops(self.net, self.input_shape)
        self.extra = nn.ModuleDict(
            {
                f"{stage}_": nn.ModuleDict(
                    {
                        "ece": calibration_error(num_classes, ECE_BINS),
                        **{
                            f"member_acc_{i}": MulticlassAccuracy(num_classes, average="micro")
                            for i in range(len(checkpoints))
                        },
                        "member_acc_mean": MeanMetric(),
                    }
                )
                for stage in ("val", "test")
            }
        )

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        raise RuntimeError("EnsembleModule only evaluates: train its members (scripts/train_members.py).")

    def _eval_step(self, stage: str, batch: Batch) -> EvalOutput:
        member_logits = self.net.member_logits(batch["input"])
        log_probs = combine_logits(member_logits, self.net.rule)
        target = batch["target"]
        self._log_step(stage, {"loss": F.nll_loss(log_probs, target)}, log_probs, target)
        metrics = self.extra[f"{stage}_"]
        metrics["ece"].update(log_probs.exp(), target)
        for i, logits in enumerate(member_logits):
            metrics[f"member_acc_{i}"].update(logits, target)
        member_correct = (member_logits.argmax(-1) == target).float().mean(0)
        metrics["member_acc_mean"].update(member_correct)
        return EvalOutput(logits=log_probs.detach(), target=target)

    def _log_epoch(self, stage: str) -> None:
        super()._log_epoch(stage)
        if stage == "train":
            return
        for name, metric in self.extra[f"{stage}_"].items():
            if metric.update_called:
                self.log(f"{stage}/{name}", metric.compute())
            metric.reset()
        self.log(f"{stage}/flops_per_example", float(self.flops_per_example))


@torch.inference_mode()
def predict_logits(net: nn.Module, loader: Any, *, indices: bool = False) -> tuple[Tensor, ...]:
    """``net``'s fp32 outputs and the targets over every batch of ``loader`` (batches with ``input`` and
    ``target``), in eval mode on ``net``'s device; the results are on the CPU.

    With ``indices``, a third tensor holds the items' stable ``index`` (an :class:`IndexedDataset`'s), to
    put predictions back in dataset order when the loader shuffles or covers a subset."""
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = net.training
    net.eval()
    outputs, targets, index = [], [], []
    try:
        for batch in loader:
            outputs.append(net(batch["input"].to(device)).float().cpu())
            targets.append(batch["target"])
            if indices:
                index.append(batch["index"])
    finally:
        net.train(was_training)
    out = (torch.cat(outputs), torch.cat(targets))
    return (*out, torch.cat(index)) if indices else out
