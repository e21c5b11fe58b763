"""A generalist with its specialists (Hinton, Vinyals & Dean 2015, section 5.3): :class:`SpecialistTeacher`,
the combination as one network (a teacher wherever a teacher is accepted), and :class:`SpecialistEnsemble`,
its evaluation for ``kd test`` / ``kd validate`` with the per-sample records it scores.

The maths (activation, KL combination, averaging, the report) is
:mod:`~kd_lightning.specialists.combination`; this module loads and runs the networks, gathers the records
across processes and logs the report.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from kd_lightning.clustering import ClassGroups, first_per_index
from kd_lightning.contracts import Batch, EvalOutput
from kd_lightning.costs import forward_flops
from kd_lightning.frozen import FrozenNetworks
from kd_lightning.modules import ClassifierBase
from kd_lightning.parallel import MemberPool, run_members
from kd_lightning.specialists.combination import (
    KLCombination,
    active_specialists,
    average_specialists,
    kl_combination,
    specialist_report,
)
from kd_lightning.specialists.module import SpecialistModule, load_generalist, load_specialist


class _EvalRecords(Metric):
    """Per-sample integer records ``(N, R)`` keyed by index, gathered across processes, padding dropped."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def update(self, index: Tensor, rows: Tensor) -> None:
        self.index.append(index.long())
        self.rows.append(rows.long())

    def compute(self) -> Tensor:
        # After a DDP sync the list states are already concatenated tensors.
        if isinstance(self.index, list) and not self.index:
            raise RuntimeError("no evaluation batch was recorded.")
        index, rows = dim_zero_cat(self.index), dim_zero_cat(self.rows)
        return rows[first_per_index(index)]


def _log(probs: Tensor) -> Tensor:
    """Log-probabilities, with 0 floored to the smallest fp32 number instead of ``-inf``."""
    return probs.clamp_min(torch.finfo(torch.float32).tiny).log()


# Leading columns of the per-sample records; one column per specialist (active or not) follows.
METHODS = ("generalist", "kl", "average")
_COLUMNS = ("target", *METHODS, *(f"cond_{m}" for m in METHODS), "covered")


class SpecialistOutputs(NamedTuple):
    """One batch through a generalist and its active specialists: what the combination rules take."""

    generalist: Tensor  # (N, C) the generalist's probabilities
    specialists: list[Tensor]  # M tensors (N, G_m + 1): probabilities where active, 0 elsewhere
    groups: list[Tensor]  # M class-id tensors, in the order of the specialists' outputs
    active: Tensor  # (N, M) bool


class SpecialistTeacher(nn.Module):
    """A generalist and its specialists combined by KL minimisation, as one network: ``forward`` returns the
    log-probabilities ``log q`` of :func:`kl_combination`, so it is a teacher wherever a teacher is accepted
    (``DistillationModule(teacher=...)``; in YAML a ``class_path`` with the three paths), live or filled
    once into a soft-target store (``SoftTargetCache``, :func:`kd_lightning.cache.fill_store`).

    For each input the generalist's top-``top_n`` classes activate every specialist whose group contains
    one; each specialist runs only on the inputs it is active for (one after another by default;
    :meth:`run` takes a :class:`~kd_lightning.parallel.MemberPool` of the specialists to run them in
    parallel processes, with the same outputs).

    **Temperature.** Log-probabilities are valid logits: ``softmax(log q) = q``, so at ``T = 1`` a
    student's soft targets are the combination itself. At ``T != 1`` a distillation objective takes
    ``softmax(log q / T)``, which is ``q`` raised to the power ``1/T`` and renormalised: the combination
    flattened (``T > 1``) or sharpened (``T < 1``), as the softmax of a single teacher's logits at ``T``.
    It is *not* the combination of the networks' own tempered distributions: the KL combination is solved
    once, at ``T = 1``.

    The networks are frozen (eval mode, no gradients). A soft-target store's teacher fingerprint covers
    the weights and the solver's settings (``top_n``, ``max_iter`` and ``tol`` are in the ``repr``).

    Args:
        generalist_ckpt: the generalist's checkpoint.
        specialist_ckpts: specialist checkpoints (any order; each names its group).
        groups_file: the groups file the specialists were trained from; each checkpoint's classes must
            equal its group in this file.
        num_classes: the data's number of classes (checked against the generalist); optional.
        input_shape: shape of one input; default the generalist's.
        top_n: how many of the generalist's best classes activate specialists (paper: 1).
        max_iter: iteration cap of the KL solver.
        tol: the KL solver's stopping tolerance (nats).

    Raises:
        ValueError: no specialist, a checkpoint for another group or label space, two checkpoints for one
            group, a generalist for another number of classes, or a bad ``top_n``.
        FileNotFoundError: a checkpoint or the groups file is missing.
    """

    def __init__(
        self,
        generalist_ckpt: str,
        specialist_ckpts: list[str],
        groups_file: str,
        num_classes: int | None = None,
        input_shape: tuple[int, ...] | None = None,
        top_n: int = 1,
        max_iter: int = 500,
        tol: float = 1e-6,
    ) -> None:
        super().__init__()
        generalist = load_generalist(generalist_ckpt)
        classes = int(generalist.num_classes)
        if num_classes is not None and num_classes != classes:
            raise ValueError(f"`generalist_ckpt` predicts {classes} classes, but num_classes={num_classes}.")
        self.generalist: ClassifierBase = generalist
        self.num_classes = classes
        self.input_shape = tuple(input_shape) if input_shape is not None else tuple(generalist.input_shape)
        self.groups = ClassGroups.load(groups_file, classes)
        if not specialist_ckpts:
            raise ValueError("`specialist_ckpts` is empty: give at least one specialist checkpoint.")
        specialists: list[SpecialistModule] = []
        seen: dict[int, str] = {}
        for path in specialist_ckpts:
            specialist = load_specialist(path)
            self._check_specialist(str(path), specialist, seen)
            specialists.append(specialist)
        self.specialists = nn.ModuleList(specialists)
        if not (isinstance(top_n, int) and 1 <= top_n <= classes):
            raise ValueError(f"`top_n` must be an integer in [1, {classes}], got {top_n!r}.")
        self.top_n, self.max_iter, self.tol = top_n, max_iter, tol
        membership = torch.zeros(len(specialists), classes, dtype=torch.bool)
        for k, s in enumerate(specialists):
            membership[k, s.group_classes] = True
        self.register_buffer("membership", membership)
        self.requires_grad_(False)
        self.train(False)

    def _check_specialist(self, path: str, specialist: SpecialistModule, seen: dict[int, str]) -> None:
        g = specialist.group
        if specialist.num_classes != self.num_classes:
            raise ValueError(
                f"`specialist_ckpts`: {path!r} was trained for {specialist.num_classes} classes, the generalist "
                f"predicts {self.num_classes}."
            )
        if not 0 <= g < len(self.groups.groups) or specialist.group_classes != self.groups.group(g):
            expected = self.groups.groups[g] if 0 <= g < len(self.groups.groups) else "not in the file"
            raise ValueError(
                f"`specialist_ckpts`: {path!r} is a specialist for group {g} with classes "
                f"{specialist.group_classes}, but group {g} of `groups_file` is {expected}: it was trained "
                "for another group or another groups file."
            )
        if g in seen:
            raise ValueError(f"`specialist_ckpts`: {seen[g]!r} and {path!r} are both for group {g}.")
        seen[g] = path

    def train(self, mode: bool = True) -> SpecialistTeacher:
        """Always eval mode: the networks are frozen (a student's ``train()`` reaches its teacher too)."""
        return super().train(False)

    def run(self, x: Tensor, pool: MemberPool | None = None) -> SpecialistOutputs:
        """The generalist on ``x``, then each specialist on the inputs it is active for.

        Args:
            x: one batch.
            pool: a :class:`~kd_lightning.parallel.MemberPool` of :attr:`specialists` (in this order) to run
                them in parallel processes; default one after another here. The outputs are the same.
        """
        pg = self.generalist(x).float().softmax(-1)
        active = active_specialists(pg, self.membership, self.top_n)
        rows = [active[:, k].nonzero().squeeze(1) for k in range(len(self.specialists))]
        raw = run_members(self.specialists, x, rows) if pool is None else pool.run(x, rows)
        outputs = []
        for specialist, selected, logits in zip(self.specialists, rows, raw, strict=True):
            probs = torch.zeros(x.shape[0], specialist.num_outputs, device=pg.device)
            if logits is not None:  # a specialist runs only where it is active: the paper's inference saving
                probs[selected] = logits.to(pg.device).softmax(-1)
            outputs.append(probs)
        return SpecialistOutputs(pg, outputs, [s.classes for s in self.specialists], active)

    def combine(self, outputs: SpecialistOutputs) -> KLCombination:
        """The KL combination of one batch's :meth:`run` (:func:`kl_combination` with this teacher's settings)."""
        return kl_combination(
            outputs.generalist, outputs.specialists, outputs.groups, outputs.active, self.max_iter, self.tol
        )

    def forward(self, x: Tensor) -> Tensor:
        """Log-probabilities ``(N, C)`` of the KL combination (0 floored to the smallest fp32 number)."""
        return _log(self.combine(self.run(x)).probs)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, specialists={len(self.specialists)}, top_n={self.top_n}, "
            f"max_iter={self.max_iter}, tol={self.tol}"
        )


class SpecialistEnsemble(FrozenNetworks, L.LightningModule):
    """Evaluate a generalist with its specialists (Hinton et al. 2015, §5.3): ``kd test`` / ``kd validate``.

    The networks and the prediction are a :class:`SpecialistTeacher`'s (attribute ``combination``): for
    each input the generalist's top-``top_n`` classes activate every specialist whose group contains one;
    each specialist runs only on the inputs it is active for; the outputs are combined by
    :func:`kl_combination` (the model's prediction). Two simple alternatives are scored on the same
    forward passes: the generalist alone and :func:`average_specialists`.

    Logs, per stage: ``acc`` (KL combination), ``acc_generalist``, ``acc_average``; the same restricted
    to the specialists' classes on the inputs of those classes (``cond_acc...``, the paper's
    conditional accuracy); ``acc_cover{k}`` / ``acc_generalist_cover{k}`` by how many specialists
    cover the true class (Table 4); ``specialists_per_input``; ``cost`` (forward FLOPs per input
    relative to the generalist alone) and ``kl_iterations``. The full report is kept in :attr:`report`.
    Validation and test return an :class:`~kd_lightning.contracts.EvalOutput`: the KL combination's
    log-probabilities and the target.

    The generalist and the specialists are frozen (:class:`~kd_lightning.frozen.FrozenNetworks`): in eval
    mode whatever ``train()`` is called with, without gradients, and reloaded from their checkpoints
    rather than saved in the ensemble's.

    Args:
        generalist_ckpt: the generalist's checkpoint.
        specialist_ckpts: specialist checkpoints (any order; each names its group).
        groups_file: the groups file the specialists were trained from; each checkpoint's classes must
            equal its group in this file.
        num_classes: linked from the DataModule (checked against the generalist); optional.
        input_shape: linked from the DataModule; optional.
        top_n: how many of the generalist's best classes activate specialists (paper: 1).
        average_top: how many of the most confident specialists the averaging alternative uses.
        max_iter: iteration cap of the KL solver.
        tol: the KL solver's stopping tolerance (nats).

    Raises:
        ValueError: as :class:`SpecialistTeacher`, or a bad ``average_top``.
    """

    def __init__(
        self,
        generalist_ckpt: str,
        specialist_ckpts: list[str],
        groups_file: str,
        num_classes: int | None = None,
        input_shape: tuple[int, ...] | None = None,
        top_n: int = 1,
        average_top: int = 1,
        max_iter: int = 500,
        tol: float = 1e-6,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        combination = SpecialistTeacher(
            generalist_ckpt, specialist_ckpts, groups_file, num_classes, input_shape, top_n, max_iter, tol
        )
        self.freeze("combination", combination)
        if not (isinstance(average_top, int) and average_top >= 1):
            raise ValueError(f"`average_top` must be a positive integer, got {average_top!r}.")
        self.average_top = average_top
        self.num_classes, self.input_shape = combination.num_classes, combination.input_shape
        self.records = nn.ModuleDict({stage: _EvalRecords() for stage in ("val", "test")})
        self.report: dict[str, Any] = {}
        self._flops: tuple[int, Tensor] | None = None

    @property
    def generalist(self) -> ClassifierBase:
        return self.combination.generalist

    @property
    def specialists(self) -> nn.ModuleList:
        return self.combination.specialists

    @property
    def membership(self) -> Tensor:
        return self.combination.membership

    def configure_optimizers(self) -> None:
        return None

    def run_networks(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
        """The networks' part of inference, one after another (:meth:`SpecialistTeacher.run`): the generalist,
        then each specialist on the inputs it is active for; nothing is combined. Specialists may differ in
        architecture and size: each is read only through its probabilities over its group plus the dustbin.

        Returns:
            ``(generalist_probs (N, C), specialist_probs [(N, G_m + 1)], groups [class ids], active (N, M))``;
            a specialist's rows where it is inactive are zeros.
        """
        out = self.combination.run(x)
        return out.generalist, out.specialists, out.groups, out.active

    def combine(self, x: Tensor) -> dict[str, Any]:
        """Everything for a batch: ``generalist``, ``kl`` and ``average`` probabilities ``(N, C)``,
        ``active`` ``(N, M)`` and the solver's ``iterations``."""
        out = self.combination.run(x)
        kl = self.combination.combine(out)
        average = average_specialists(
            out.generalist, out.specialists, out.groups, out.active, self.average_top
        )
        return {
            "generalist": out.generalist,
            "kl": kl.probs,
            "average": average,
            "active": out.active,
            "iterations": kl.iterations,
        }

    def forward(self, x: Tensor) -> Tensor:
        """Log-probabilities of the KL combination."""
        return self.combination(x)

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        out = self.combine(batch["input"])
        return {"index": batch["index"], "probs": out["kl"], "generalist_probs": out["generalist"]}

    def validation_step(self, batch: Batch, batch_idx: int) -> EvalOutput:
        return self._eval_step("val", batch)

    def test_step(self, batch: Batch, batch_idx: int) -> EvalOutput:
        return self._eval_step("test", batch)

    def _eval_step(self, stage: str, batch: Batch) -> EvalOutput:
        out = self.combine(batch["input"])
        target = batch["target"]
        union = self.membership.any(0)  # classes some specialist covers
        columns = [target]
        columns += [out[m].argmax(-1) for m in METHODS]
        columns += [out[m].masked_fill(~union, -1.0).argmax(-1) for m in METHODS]
        columns += [self.membership[:, target].sum(0)]
        rows = torch.cat([torch.stack(columns, -1), out["active"].long()], -1)
        self.records[stage].update(batch["index"], rows)
        self.log(
            f"{stage}/kl_iterations",
            float(out["iterations"]),
            on_step=False,
            on_epoch=True,
            reduce_fx="max",
            batch_size=target.shape[0],
        )
        return {"logits": _log(out["kl"]).detach(), "target": target}

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def _epoch_end(self, stage: str) -> None:
        rows = self.records[stage].compute()  # collective under DDP: every rank calls it
        self.records[stage].reset()
        if self.trainer.sanity_checking:
            return
        col = {name: rows[:, i] for i, name in enumerate(_COLUMNS)}
        active = rows[:, len(_COLUMNS) :].bool()
        union = self.membership.any(0)
        report = specialist_report(
            col["target"],
            {m: col[m] for m in METHODS},
            col["covered"],
            {m: col[f"cond_{m}"] for m in METHODS},
            union[col["target"]],
        )
        report.update(self.inference_cost(active))
        report["groups"] = [s.group_classes for s in self.specialists]
        self.report = report
        # Every rank holds the same gathered records, hence the same values: no further reduction.
        values: dict[str, float] = {}
        for key in ("acc", "cond_acc"):
            values[key] = report[key]["kl"]
            values |= {f"{key}_{m}": report[key][m] for m in METHODS if m != "kl"}
        for row in report["by_cover"]:
            values[f"acc_cover{row['cover']}"] = row["acc"]["kl"]
            values[f"acc_generalist_cover{row['cover']}"] = row["acc"]["generalist"]
        values |= {"specialists_per_input": report["specialists_per_input"], "cost": report["cost"]}
        for name, value in values.items():
            if not math.isnan(value):
                self.log(f"{stage}/{name}", value, prog_bar=name == "acc")

    def inference_cost(self, active: Tensor) -> dict[str, Any]:
        """Forward FLOPs per input relative to the generalist alone: ``1 + sum_m F_m P(m active) / F_g``.

        ``F_m`` is specialist ``m``'s own network's FLOPs (specialists may differ in size); only the
        specialists that ran count, as at inference.

        Args:
            active: ``(N, M)`` bool, which specialist ran on which input.

        Returns:
            ``specialists_per_input``, ``activation_rate`` (per specialist), ``flops_generalist`` (``F_g``),
            ``flops_specialists`` (each ``F_m``) and ``cost``.
        """
        if self._flops is None:
            self._flops = (
                forward_flops(self.generalist.net, self.input_shape),
                torch.tensor([float(forward_flops(s.net, self.input_shape)) for s in self.specialists]),
            )
        generalist, specialists = self._flops
        rate = active.float().mean(0).cpu()
        return {
            "specialists_per_input": float(rate.sum()),
            "activation_rate": rate.tolist(),
            "flops_generalist": generalist,
            "flops_specialists": [int(f) for f in specialists.tolist()],
            "cost": 1.0 + float((rate * specialists).sum()) / max(generalist, 1),
        }
